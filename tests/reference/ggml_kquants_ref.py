"""Slow scalar oracles: ggml's make_qkx2_quants, make_q3_quants, quantize_row_q2_K_ref and
quantize_row_q3_K_ref (ggml-quants.c) one float32 operation at a time, as the C loops run, for checking
the vectorized lowbit.core.ggml_kquants."""
import numpy as np

F = np.float32
GROUP_MAX_EPS = F(1e-15)


def nearest_int(v) -> int:
    """ggml's nearest_int as C runs it: v + 1.5 * 2**23 in float32, the low 23 bits of the result."""
    with np.errstate(over="ignore", invalid="ignore"):
        i = int(np.array([F(F(v) + F(12582912))], F).view(np.int32)[0])
    return (i & 0x7FFFFF) - 0x400000


def fp16(v) -> F:
    """GGML_FP32_TO_FP16 then back: the value a block stores."""
    return F(np.float16(F(v)))


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad=False):
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
        best = F(best + F(w[i] * (abs(d) if use_mad else F(d * d))))
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
                mad = F(mad + F(w[i] * (abs(d) if use_mad else F(d * d))))
            if mad < best:
                L, best, scale, mn = La, mad, ts, tm
    return scale, -mn, L


def make_q3_quants(x, nmax):
    """do_rmse = true. x: [n] float32 -> (scale, codes list in 0 .. 2*nmax-1)."""
    n, amax, mx = len(x), F(0), F(0)
    for i in range(n):
        if abs(x[i]) > amax:
            amax, mx = abs(x[i]), x[i]
    if amax < GROUP_MAX_EPS:
        return F(0), [0] * n
    iscale = F(F(-nmax) / mx)
    L, sumlx, suml2 = [], F(0), F(0)
    for i in range(n):
        L.append(max(-nmax, min(nmax - 1, nearest_int(F(iscale * x[i])))))
        w = F(x[i] * x[i])
        sumlx = F(sumlx + F(F(w * x[i]) * F(L[i])))
        suml2 = F(suml2 + F(F(w * F(L[i])) * F(L[i])))
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = F(x[i] * x[i])
            slx = F(sumlx - F(F(w * x[i]) * F(L[i])))
            if slx > 0:
                sl2 = F(suml2 - F(F(w * F(L[i])) * F(L[i])))
                new_l = max(-nmax, min(nmax - 1, nearest_int(F(F(x[i] * sl2) / slx))))
                if new_l != L[i]:
                    slx = F(slx + F(F(w * x[i]) * F(new_l)))
                    sl2 = F(sl2 + F(F(w * F(new_l)) * F(new_l)))
                    if sl2 > 0 and F(F(slx * slx) * suml2) > F(F(sumlx * sumlx) * sl2):
                        L[i], sumlx, suml2 = new_l, slx, sl2
                        changed += 1
        if not changed:
            break
    return F(sumlx / suml2), [l + nmax for l in L]


def _pack_2bit(L) -> list:
    return [L[j + l] | L[j + l + 32] << 2 | L[j + l + 64] << 4 | L[j + l + 96] << 6
            for j in (0, 128) for l in range(32)]


def _f16_bytes(v) -> list:
    return list(np.array([v], np.float16).view(np.uint8))


def quantize_q2_k_block(x) -> bytes:
    """x: [256] float32 -> the 84 bytes of one block_q2_K (scales[16], qs[64], d, dmin)."""
    L, scales, mins = [0] * 256, [], []
    for j in range(16):
        sub = x[16 * j:16 * j + 16]
        s, m, Lj = make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, use_mad=True)
        scales.append(s)
        mins.append(m)
        L[16 * j:16 * j + 16] = Lj
    max_scale, max_min = max([F(0), *scales]), max([F(0), *mins])
    sc = [0] * 16
    d = dmin = F(0)
    if max_scale > 0:
        iscale = F(F(15) / max_scale)
        sc = [nearest_int(F(iscale * s)) & 0xFF for s in scales]
        d = F(max_scale / F(15))
    if max_min > 0:
        iscale = F(F(15) / max_min)
        sc = [(c | nearest_int(F(iscale * m)) << 4) & 0xFF for c, m in zip(sc, mins)]
        dmin = F(max_min / F(15))
    for j in range(16):
        dj = F(fp16(d) * F(sc[j] & 0xF))
        if dj == 0:
            continue
        dm = F(fp16(dmin) * F(sc[j] >> 4))
        for i in range(16):
            L[16 * j + i] = max(0, min(3, nearest_int(F(F(x[16 * j + i] + dm) / dj))))
    return bytes(sc + _pack_2bit(L) + _f16_bytes(d) + _f16_bytes(dmin))


def quantize_q3_k_block(x) -> bytes:
    """x: [256] float32 -> the 110 bytes of one block_q3_K (hmask[32], qs[64], scales[12], d)."""
    L, scales = [0] * 256, []
    for j in range(16):
        s, Lj = make_q3_quants(x[16 * j:16 * j + 16], 4)
        scales.append(s)
        L[16 * j:16 * j + 16] = Lj
    amax = max_scale = F(0)
    for s in scales:
        if abs(s) > amax:
            amax, max_scale = abs(s), s
    packed = [0] * 12
    d = F(0)
    if max_scale != 0:
        iscale = F(F(-32) / max_scale)
        for j, s in enumerate(scales):
            l = max(-32, min(31, nearest_int(F(iscale * s)))) + 32
            if j < 8:
                packed[j] = l & 0xF
            else:
                packed[j - 8] |= (l & 0xF) << 4
            packed[j % 4 + 8] |= (l >> 4) << (2 * (j // 4))
        d = F(F(1) / iscale)
    for j in range(16):
        sc = packed[j] & 0xF if j < 8 else packed[j - 8] >> 4
        sc = (sc | ((packed[8 + j % 4] >> (2 * (j // 4))) & 3) << 4) - 32
        dj = F(fp16(d) * F(sc))
        if dj == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-4, min(3, nearest_int(F(x[16 * j + i] / dj)))) + 4
    hmask = [0] * 32
    for j in range(256):
        if L[j] > 3:
            hmask[j % 32] |= 1 << (j // 32)
            L[j] -= 4
    return bytes(hmask + _pack_2bit(L) + packed + _f16_bytes(d))
