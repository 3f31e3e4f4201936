"""Slow scalar oracle: ggml's make_qkx2_quants (ggml-quants.c) one float32 operation at a time, as the C
loop runs, for checking the vectorized lowbit.core.ggml_kquants.make_qkx2_quants."""
import numpy as np

F = np.float32


def nearest_int(v) -> int:
    return int(np.rint(F(v)))


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    """x, w: [n] float32 -> (scale, min subtracted, codes list)."""
    n = len(x)
    mn, mx, sw, sx = x[0], x[0], w[0], F(w[0] * x[0])
    for i in range(1, n):
        mn, mx = min(mn, x[i]), max(mx, x[i])
        sw, sx = F(sw + w[i]), F(sx + F(w[i] * x[i]))
    mn = min(mn, F(0))
    if mx == mn:
        return F(0), -mn, [0] * n
    iscale = F(F(nmax) / F(mx - mn))
    scale, best, L = F(F(1) / iscale), F(0), []
    for i in range(n):
        L.append(max(0, min(nmax, nearest_int(F(iscale * F(x[i] - mn))))))
        d = F(F(F(scale * F(L[i])) + mn) - x[i])
        best = F(best + F(w[i] * F(d * d)))
    for s in range(nstep + 1):
        iscale = F(F(F(F(rmin) + F(F(rdelta) * F(s))) + F(nmax)) / F(mx - mn))
        sl = sl2 = sxl = F(0)
        La = []
        for i in range(n):
            La.append(max(0, min(nmax, nearest_int(F(iscale * F(x[i] - mn))))))
            wl = F(w[i] * F(La[i]))
            sl, sl2, sxl = F(sl + wl), F(sl2 + F(wl * F(La[i]))), F(sxl + F(wl * x[i]))
        D = F(F(sw * sl2) - F(sl * sl))
        if D > 0:
            ts = F(F(F(sw * sxl) - F(sx * sl)) / D)
            tm = F(F(F(sl2 * sx) - F(sl * sxl)) / D)
            if tm > 0:
                tm, ts = F(0), F(sxl / sl2)
            mad = F(0)
            for i in range(n):
                d = F(F(F(ts * F(La[i])) + tm) - x[i])
                mad = F(mad + F(w[i] * F(d * d)))
            if mad < best:
                L, best, scale, mn = La, mad, ts, tm
    return scale, -mn, L
