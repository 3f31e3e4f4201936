"""GGML block quantization (llama.cpp's tensor types) with numba: one fused pass per block that searches
the scales, rounds, and writes the stored bytes, blocks in parallel.

Each block type follows ggml's reference (`quantize_row_*_ref` in ggml-quants.c; for IQ4_NL
`quantize_iq4_nl` without importance, as llama-quantize runs it) operation for operation in float32 and
in the C loops' order, so the bytes equal llama-quantize's and those of lowbit.core.ggml_kquants /
ggml_blocks, the vectorized numpy reference (tests/test_ggml_fit_kernels.py compares them). numba
typing would widen a float32 op to float64 whenever an integer or a Python float joins it, so every
constant is an np.float32 and every integer is cast with _f before it meets a float; no fast-math,
so LLVM neither reorders nor contracts a product and a sum into a fused multiply-add.

    fit(kind, x)       x: [n, block_size] float32 -> (blocks [n, type_size] uint8, codes [n, block_size]
                       uint8, scale and offset [n, block_size // sub] float32: core.ggml_kquants.BlockFit's
                       fields)
    pack(kind, b, L)   the blocks b with their codes replaced by L (a solver's codes on the same grid)
"""
# ruff: noqa: PLR1730 -- the explicit `if v < mn: mn = v` scans are C's: min()/max() may differ on -0.0 and NaN
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# one lock for numba's thread pool, which two threads must not enter at once
from .fused import _LOCK

_f = np.float32
F0, F1 = _f(0.0), _f(1.0)
MAGIC = _f(12582912.0)  # 1.5 * 2**23: nearest_int's shift
GROUP_MAX_EPS = _f(1e-15)
TENTH = _f(0.1)
IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
# kind ids of the switch in _fit_all and _pack_all: (id, block size, type size, sub-block size)
KINDS = {"q8_0": (0, 32, 34, 32), "q4_0": (1, 32, 18, 32), "q4_1": (2, 32, 20, 32), "q5_0": (3, 32, 22, 32),
         "q5_1": (4, 32, 24, 32), "iq4_nl": (5, 32, 18, 32), "q2_k": (6, 256, 84, 16), "q3_k": (7, 256, 110, 16),
         "q4_k": (8, 256, 144, 32), "q5_k": (9, 256, 176, 32), "q6_k": (10, 256, 210, 16)}
CHUNK = 64  # blocks per parallel task: the scratch arrays are made once per chunk

_jit = njit(cache=True, error_model="numpy")  # numpy's error model: x / 0 is inf or nan, as in C


# -- scalar helpers -----------------------------------------------------------------------------------
@_jit
def _nearest_int(v):
    """ggml nearest_int: v + 1.5 * 2**23 in float32, the low 23 bits (wraps for |v| >= 2**22, as C's does)."""
    b = np.int64(np.float32(v + MAGIC).view(np.int32))
    return (b & 0x7FFFFF) - 0x400000


@_jit
def _fp16_bits(v):
    """float32 -> IEEE half bits, round to nearest even, overflow to inf (ggml_compute_fp32_to_fp16)."""
    base = (abs(v) * _f(2.0 ** 112)) * _f(2.0 ** -110)
    w = np.int64(np.float32(v).view(np.uint32))
    shl1 = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1 & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = np.uint32((bias >> 1) + 0x07800000).view(np.float32) + base
    bits = np.int64(np.float32(base).view(np.uint32))
    nonsign = ((bits >> 13) & 0x7C00) + (bits & 0xFFF)
    return (sign >> 16) | (0x7E00 if shl1 > 0xFF000000 else nonsign)


@_jit
def _fp16_value(h):
    """IEEE half bits -> its float32 value (exact)."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:  # zero and subnormals: m * 2**-24
        a = _f(m) * _f(2.0 ** -24)
        return -a if sign else a
    if e == 31:
        return np.uint32(sign | 0x7F800000 | (m << 13)).view(np.float32)
    return np.uint32(sign | ((e + 112) << 23) | (m << 13)).view(np.float32)


@_jit
def _store_fp16(v, out, o):
    """Round v to half, write it little-endian at out[o:o + 2]; return the stored value as float32."""
    h = _fp16_bits(v)
    out[o] = h & 0xFF
    out[o + 1] = h >> 8
    return _fp16_value(h)


@_jit
def _signed_absmax(x, o, n):
    """The value of largest magnitude in x[o:o + n], the first one on ties (ggml's strict `>` scan)."""
    amax, mx = F0, F0
    for i in range(o, o + n):
        a = abs(x[i])
        if a > amax:
            amax, mx = a, x[i]
    return amax, mx


@_jit
def _iq4nl_index(v):
    """ggml best_index_int8 over IQ4NL: the nearest level, the upper one on ties."""
    if v <= IQ4NL[0]:
        return 0
    if v >= IQ4NL[15]:
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if v < IQ4NL[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if v - IQ4NL[hi - 1] < IQ4NL[hi] - v else hi


@intrinsic
def _stack(typingctx, n, dtype):
    """An array of n (a literal) values on the stack: LLVM keeps small ones in registers, and knows that
    no other array aliases it, so the loops over it vectorize."""
    if not isinstance(n, types.IntegerLiteral):
        raise numba.core.errors.RequireLiteralValue(n)
    size, ty = n.literal_value, dtype.dtype

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(ty), size=context.get_constant(types.intp, size))
    return types.CPointer(ty)(n, dtype), codegen


@_jit
def _f32s(n):
    return numba.carray(_stack(n, np.float32), n)


# -- the searches -------------------------------------------------------------------------------------
# The searches run NL sub-blocks side by side ("lanes"): the float32 terms of each sum are made a whole
# sub-block at a time (vectorized), then added in C's order, element by element, with the NL lanes'
# accumulators interleaved so that NL independent chains share the adder instead of waiting on one.
@_jit
def _qkx2(x, o, NL, n, w, nmax, rmin, rdelta, nstep, use_mad, L, scale_out, min_out):
    """ggml make_qkx2_quants on NL sub-blocks of n values, sub-block s = x[o + s*n : o + (s+1)*n] with weights
    w[s*n : (s+1)*n] -> scale_out[s], min_out[s] (the min subtracted); codes into L[o + s*n + i]."""
    mn, mx, sum_w, sum_x = _f32s(16), _f32s(16), _f32s(16), _f32s(16)
    scale, best, sl, sl2, sxl, D, ts, tm, err = (_f32s(16), _f32s(16), _f32s(16), _f32s(16), _f32s(16), _f32s(16),
                                                  _f32s(16), _f32s(16), _f32s(16))
    T1, T2, T3 = _f32s(256), _f32s(256), _f32s(256)
    Laux = numba.carray(_stack(256, np.uint8), 256)
    for s in range(NL):
        mn[s], mx[s], sum_w[s] = x[o + s * n], x[o + s * n], w[s * n]
        sum_x[s] = sum_w[s] * x[o + s * n]
    for i in range(1, n):
        for s in range(NL):
            v = x[o + s * n + i]
            if v < mn[s]:
                mn[s] = v
            if v > mx[s]:
                mx[s] = v
            sum_w[s] += w[s * n + i]
            sum_x[s] += w[s * n + i] * v
    fmax = _f(nmax)
    mn0 = _f32s(16)  # the min before the search: a flat sub-block (max == min) keeps it, as C returns early
    for s in range(NL):
        if mn[s] > F0:
            mn[s] = F0
        mn0[s] = mn[s]
    for s in range(NL):  # the first codes, at nmax / (max - min)
        iscale = fmax / (mx[s] - mn[s])
        scale[s] = F1 / iscale
        for i in range(n):
            k = s * n + i
            l = min(max(_nearest_int(iscale * (x[o + k] - mn[s])), 0), nmax)
            L[o + k] = l
            diff = scale[s] * _f(l) + mn[s] - x[o + k]
            T1[k] = w[k] * (abs(diff) if use_mad else diff * diff)
    for s in range(NL):
        best[s] = F0
    for i in range(n):
        for s in range(NL):
            best[s] += T1[s * n + i]
    for step in range(nstep + 1):
        for s in range(NL):
            iscale = (rmin + rdelta * _f(step) + fmax) / (mx[s] - mn[s])  # C's min: the best candidate's so far
            for i in range(n):
                k = s * n + i
                l = min(max(_nearest_int(iscale * (x[o + k] - mn[s])), 0), nmax)
                Laux[k] = l
                wl = w[k] * _f(l)
                T1[k] = wl
                T2[k] = wl * _f(l)
                T3[k] = wl * x[o + k]
        for s in range(NL):
            sl[s], sl2[s], sxl[s] = F0, F0, F0
        for i in range(n):
            for s in range(NL):
                sl[s] += T1[s * n + i]
                sl2[s] += T2[s * n + i]
                sxl[s] += T3[s * n + i]
        for s in range(NL):
            D[s] = sum_w[s] * sl2[s] - sl[s] * sl[s]
            a = (sum_w[s] * sxl[s] - sum_x[s] * sl[s]) / D[s]
            b = (sl2[s] * sum_x[s] - sl[s] * sxl[s]) / D[s]
            if b > F0:
                b = F0
                a = sxl[s] / sl2[s]
            ts[s], tm[s] = a, b
            for i in range(n):
                k = s * n + i
                diff = a * _f(Laux[k]) + b - x[o + k]
                T1[k] = w[k] * (abs(diff) if use_mad else diff * diff)
        for s in range(NL):
            err[s] = F0
        for i in range(n):
            for s in range(NL):
                err[s] += T1[s * n + i]
        for s in range(NL):
            if D[s] > F0 and err[s] < best[s]:
                for i in range(n):
                    L[o + s * n + i] = Laux[s * n + i]
                best[s], scale[s], mn[s] = err[s], ts[s], tm[s]
    for s in range(NL):
        scale_out[s], min_out[s] = scale[s], -mn[s]
        if mx[s] == mn0[s]:
            scale_out[s], min_out[s] = F0, -mn0[s]
            for i in range(n):
                L[o + s * n + i] = 0


@_jit
def _qx(x, o, NL, n, nmax, L, scale_out):
    """ggml make_qx_quants, rmse_type 1 (weights x**2), on NL sub-blocks of n values at x[o + s*n] ->
    scale_out[s]; codes 0..2*nmax-1 into L[o + s*n + i]."""
    amax, mx, sumlx, suml2, scale, best = _f32s(16), _f32s(16), _f32s(16), _f32s(16), _f32s(16), _f32s(16)
    T1, T2 = _f32s(256), _f32s(256)
    Laux = numba.carray(_stack(256, np.uint8), 256)
    for s in range(NL):
        amax[s], mx[s] = _signed_absmax(x, o + s * n, n)
    for step in range(-10, 10):  # -10: the first codes, at -nmax / max; then C's is = -9..9 but 0
        if step == 0:
            continue
        for s in range(NL):
            iscale = _f(-nmax) / mx[s] if step == -10 else -(_f(nmax) + TENTH * _f(step)) / mx[s]
            for i in range(n):
                k = s * n + i
                v = x[o + k]
                l = min(max(_nearest_int(iscale * v), -nmax), nmax - 1)
                Laux[k] = l + nmax
                w = v * v
                T1[k] = w * v * _f(l)
                T2[k] = w * _f(l) * _f(l)
        for s in range(NL):
            sumlx[s], suml2[s] = F0, F0
        for i in range(n):
            for s in range(NL):
                sumlx[s] += T1[s * n + i]
                suml2[s] += T2[s * n + i]
        for s in range(NL):
            if step == -10:
                scale[s] = sumlx[s] / suml2[s] if suml2[s] != F0 else F0
                best[s] = scale[s] * sumlx[s]
            elif not (suml2[s] > F0 and sumlx[s] * sumlx[s] > best[s] * suml2[s]):
                continue
            else:
                scale[s] = sumlx[s] / suml2[s]
                best[s] = scale[s] * sumlx[s]
            for i in range(n):
                L[o + s * n + i] = Laux[s * n + i]
    for s in range(NL):
        scale_out[s] = scale[s]
        if amax[s] < GROUP_MAX_EPS:  # all zero: C returns 0 and zero codes before searching
            scale_out[s] = F0
            for i in range(n):
                L[o + s * n + i] = 0


@_jit
def _q3(x, o, n, nmax, L):
    """ggml make_q3_quants with do_rmse on x[o:o + n] -> scale; codes 0..2*nmax-1 in L[o:o + n]."""
    amax, mx = _signed_absmax(x, o, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[o + i] = 0
        return F0
    iscale = _f(-nmax) / mx
    sumlx, suml2 = F0, F0
    for i in range(n):
        l = min(max(_nearest_int(iscale * x[o + i]), -nmax), nmax - 1)
        L[o + i] = l + nmax  # stored shifted (uint8); li below is the signed code
        v = x[o + i]
        w = v * v
        sumlx += w * v * _f(l)
        suml2 += w * _f(l) * _f(l)
    for _ in range(5):
        changed = 0
        for i in range(n):
            v = x[o + i]
            w = v * v
            li = np.int64(L[o + i]) - nmax
            slx = sumlx - w * v * _f(li)
            if slx > F0:
                sl2 = suml2 - w * _f(li) * _f(li)
                new_l = min(max(_nearest_int(v * sl2 / slx), -nmax), nmax - 1)
                if new_l != li:
                    slx += w * v * _f(new_l)
                    sl2 += w * _f(new_l) * _f(new_l)
                    if sl2 > F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[o + i] = new_l + nmax
                        sumlx, suml2 = slx, sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > F0 else F0


# -- code packing, one block: shared by the fused fits and pack() ---------------------------------------
@_jit
def _pack_nibbles(L, o, out, p):
    """L[o:o + 32] codes < 16 -> out[p:p + 16]: byte j holds code j (low nibble) and code j + 16 (high)."""
    for j in range(16):
        out[p + j] = (L[o + j] & 0xF) | (L[o + j + 16] & 0xF) << 4


@_jit
def _pack_fifth_bits(L, o, out, p):
    """L[o:o + 32] 5-bit codes -> out[p:p + 4]: bit j of a little-endian uint32 is bit 4 of code j."""
    for k in range(4):
        b = 0
        for j in range(8):
            b |= ((L[o + 8 * k + j] >> 4) & 1) << j
        out[p + k] = b


@_jit
def _pack_2bit(L, out, p, mask):
    """[256] codes -> out[p:p + 64]: byte 32*h + l holds (codes 128*h + 32*k + l) & mask at bits 2k."""
    for h in range(2):
        for l in range(32):
            j = 128 * h + l
            out[p + 32 * h + l] = ((L[j] & mask) | (L[j + 32] & mask) << 2 | (L[j + 64] & mask) << 4
                                   | (L[j + 96] & mask) << 6)


@_jit
def _pack_codes(kind, L, out):
    """Write the codes of one block into its bytes (everything else in out stays)."""
    if kind == 0:  # q8_0
        for j in range(32):
            out[2 + j] = (np.int64(L[j]) - 128) & 0xFF
    elif kind == 1 or kind == 5:  # q4_0, iq4_nl
        _pack_nibbles(L, 0, out, 2)
    elif kind == 2:  # q4_1
        _pack_nibbles(L, 0, out, 4)
    elif kind == 3:  # q5_0
        _pack_fifth_bits(L, 0, out, 2)
        _pack_nibbles(L, 0, out, 6)
    elif kind == 4:  # q5_1
        _pack_fifth_bits(L, 0, out, 4)
        _pack_nibbles(L, 0, out, 8)
    elif kind == 6:  # q2_k
        _pack_2bit(L, out, 16, 3)
    elif kind == 7:  # q3_k: hmask bit j // 32 of byte j % 32 is bit 2 of code j
        for m in range(32):
            b = 0
            for k in range(8):
                b |= ((L[32 * k + m] >> 2) & 1) << k
            out[m] = b
        _pack_2bit(L, out, 32, 3)
    elif kind == 8:  # q4_k: 64-value chunks, low nibble the first 32, high the next
        for c in range(4):
            for l in range(32):
                out[16 + 32 * c + l] = (L[64 * c + l] & 0xF) | (L[64 * c + l + 32] & 0xF) << 4
    elif kind == 9:  # q5_k: as q4_k, plus bit 4 of code 64c + 32h + l at bit 2c + h of qh[l]
        for l in range(32):
            b = 0
            for c in range(4):
                b |= ((L[64 * c + l] >> 4) & 1) << (2 * c) | ((L[64 * c + l + 32] >> 4) & 1) << (2 * c + 1)
            out[16 + l] = b
        for c in range(4):
            for l in range(32):
                out[48 + 32 * c + l] = (L[64 * c + l] & 0xF) | (L[64 * c + l + 32] & 0xF) << 4
    else:  # q6_k: ql low nibbles, qh the top 2 bits, of codes 128h + 32k + l
        for h in range(2):
            for l in range(32):
                j = 128 * h + l
                q1, q2, q3, q4 = L[j], L[j + 32], L[j + 64], L[j + 96]
                out[64 * h + l] = (q1 & 0xF) | (q3 & 0xF) << 4
                out[64 * h + l + 32] = (q2 & 0xF) | (q4 & 0xF) << 4
                out[128 + 32 * h + l] = (q1 >> 4) | (q2 >> 4) << 2 | (q3 >> 4) << 4 | (q4 >> 4) << 6


# -- one block per type: scales into out's header, codes into L, scale/offset as BlockFit holds them ----
@_jit
def _block32(kind, x, out, L, scale, offset):
    """q8_0, q4_0, q4_1, q5_0, q5_1 (ggml's quantize_row_*_ref; truncation as core.ggml_blocks._trunc_u8)."""
    if kind == 0 or kind == 1 or kind == 3:
        amax, mx = _signed_absmax(x, 0, 32)
        if kind == 0:
            d = amax / _f(127)
        else:
            d = mx / (_f(-8) if kind == 1 else _f(-16))
        lo = F0
    else:
        lo, hi = x[0], x[0]
        for i in range(1, 32):
            if x[i] < lo:
                lo = x[i]
            if x[i] > hi:
                hi = x[i]
        d = (hi - lo) / (_f(15) if kind == 2 else _f(31))
        offset[0] = _store_fp16(lo, out, 2)
    inv = F1 / d if d != F0 else F0
    scale[0] = _store_fp16(d, out, 0)
    for i in range(32):
        if kind == 0:  # roundf: halves away from zero
            v = x[i] * inv
            a = abs(v)
            r = np.int64(a)
            if a - _f(r) >= _f(0.5):
                r += 1
            L[i] = (-r if v < F0 else r) + 128
        elif kind == 1:
            L[i] = min(np.int64(x[i] * inv + _f(8.5)), 15)
        elif kind == 3:
            L[i] = min(np.int64(x[i] * inv + _f(16.5)), 31)
        else:
            L[i] = min(np.int64((x[i] - lo) * inv + _f(0.5)), 15 if kind == 2 else 31)


@_jit
def _block_iq4_nl(x, out, L, scale, w):
    """ggml quantize_row_iq4_nl_impl for one 32-value block, ntry 7, weights x**2."""
    for j in range(32):
        w[j] = x[j] * x[j]
    amax, mx = _signed_absmax(x, 0, 32)
    d = F0
    if amax >= GROUP_MAX_EPS:
        d = -mx / IQ4NL[0]
        inv = F1 / d
        sumqx, sumq2 = F0, F0
        for j in range(32):
            q = IQ4NL[_iq4nl_index(inv * x[j])]
            sumqx += w[j] * q * x[j]
            sumq2 += w[j] * q * q
        d = sumqx / sumq2 if sumq2 > F0 else F0
        best = d * sumqx
        for itry in range(-7, 8):
            inv = (_f(itry) + IQ4NL[0]) / mx
            sumqx, sumq2 = F0, F0
            for j in range(32):
                q = IQ4NL[_iq4nl_index(inv * x[j])]
                sumqx += w[j] * q * x[j]
                sumq2 += w[j] * q * q
            if sumq2 > F0 and sumqx * sumqx > best * sumq2:
                d = sumqx / sumq2
                best = d * sumqx
    scale[0] = _store_fp16(d, out, 0)
    inv = F1 / d if d != F0 else F0
    for j in range(32):
        L[j] = _iq4nl_index(inv * x[j])


@_jit
def _block_k4(x, nmax, rmin, nstep, out, L, scale, offset, sc, mn):
    """Q4_K (nmax 15) and Q5_K (31): 8 sub-blocks of 32 fit by make_qkx2_quants, 6-bit scales and mins."""
    w = _f32s(256)
    for j in range(8):
        o = 32 * j
        sum_x2 = F0
        for l in range(32):
            sum_x2 += x[o + l] * x[o + l]
        av_x = np.sqrt(sum_x2 / _f(32))
        for l in range(32):
            w[o + l] = av_x + abs(x[o + l])
    _qkx2(x, 0, 8, 32, w, nmax, rmin, TENTH, nstep, False, L, sc, mn)
    max_scale, max_min = F0, F0
    for j in range(8):
        if sc[j] > max_scale:
            max_scale = sc[j]
        if mn[j] > max_min:
            max_min = mn[j]
    inv_scale = _f(63) / max_scale if max_scale > F0 else F0
    inv_min = _f(63) / max_min if max_min > F0 else F0
    for j in range(8):
        ls = min(_nearest_int(inv_scale * sc[j]) & 0xFF, 63)
        lm = min(_nearest_int(inv_min * mn[j]) & 0xFF, 63)
        if j < 4:
            out[4 + j] = ls
            out[8 + j] = lm
        else:
            out[8 + j] = (ls & 0xF) | (lm & 0xF) << 4
            out[j] |= (ls >> 4) << 6
            out[4 + j] |= (lm >> 4) << 6
    d = _store_fp16(max_scale / _f(63), out, 0)
    dmin = _store_fp16(max_min / _f(63), out, 2)
    for j in range(8):  # get_scale_min_k4
        if j < 4:
            ls, lm = out[4 + j] & 63, out[8 + j] & 63
        else:
            ls = (out[8 + j] & 0xF) | (out[j] >> 6) << 4
            lm = (out[8 + j] >> 4) | (out[4 + j] >> 6) << 4
        dj = d * _f(ls)
        dm = dmin * _f(lm)
        scale[j], offset[j] = dj, -dm
        if dj == F0:
            continue
        for i in range(32 * j, 32 * j + 32):
            L[i] = min(max(_nearest_int((x[i] + dm) / dj), 0), nmax)


@_jit
def _block_q2_k(x, out, L, scale, offset, sc, mn):
    """16 sub-blocks of 16 fit by make_qkx2_quants on weights |x|, absolute error; 4-bit scales and mins."""
    w = _f32s(256)
    for i in range(256):
        w[i] = abs(x[i])
    _qkx2(x, 0, 16, 16, w, 3, _f(-0.5), TENTH, 15, True, L, sc, mn)
    max_scale, max_min = F0, F0
    for j in range(16):
        if sc[j] > max_scale:
            max_scale = sc[j]
        if mn[j] > max_min:
            max_min = mn[j]
    for j in range(16):
        out[j] = 0
    if max_scale > F0:
        iscale = _f(15) / max_scale
        for j in range(16):
            out[j] = _nearest_int(iscale * sc[j]) & 0xFF
    d = _store_fp16(max_scale / _f(15) if max_scale > F0 else F0, out, 80)
    if max_min > F0:
        iscale = _f(15) / max_min
        for j in range(16):
            out[j] = (np.int64(out[j]) | _nearest_int(iscale * mn[j]) << 4) & 0xFF
    dmin = _store_fp16(max_min / _f(15) if max_min > F0 else F0, out, 82)
    for j in range(16):
        dj = d * _f(out[j] & 0xF)
        dm = dmin * _f(out[j] >> 4)
        scale[j], offset[j] = dj, -dm
        if dj == F0:
            continue
        for i in range(16 * j, 16 * j + 16):
            L[i] = min(max(_nearest_int((x[i] + dm) / dj), 0), 3)


@_jit
def _block_q3_k(x, out, L, scale, sc):
    """16 sub-blocks of 16 fit by make_q3_quants, 6-bit signed scales (offset 32), levels -4..3."""
    amax, max_scale = F0, F0
    for j in range(16):
        sc[j] = _q3(x, 16 * j, 16, 4, L)
        if abs(sc[j]) > amax:
            amax, max_scale = abs(sc[j]), sc[j]
    for j in range(96, 108):
        out[j] = 0
    if max_scale != F0:
        iscale = _f(-32) / max_scale
        for j in range(16):
            l = _nearest_int(iscale * sc[j])
            l = ((l + 128) & 0xFF) - 128  # C stores it in an int8_t before clamping
            l = min(max(l, -32), 31) + 32
            if j < 8:
                out[96 + j] = l & 0xF
            else:
                out[96 + j - 8] |= (l & 0xF) << 4
            out[104 + j % 4] |= (l >> 4) << (2 * (j // 4))
        d = _store_fp16(F1 / iscale, out, 108)
    else:
        d = _store_fp16(F0, out, 108)
    for j in range(16):
        low = np.int64(out[96 + j]) & 0xF if j < 8 else np.int64(out[96 + j - 8]) >> 4
        s = (low | ((np.int64(out[104 + j % 4]) >> (2 * (j // 4))) & 3) << 4) - 32
        dj = d * _f(s)
        scale[j] = dj
        if dj == F0:
            continue
        for i in range(16 * j, 16 * j + 16):
            L[i] = min(max(_nearest_int(x[i] / dj), -4), 3) + 4


@_jit
def _block_q6_k(x, out, L, scale, sc):
    """16 sub-blocks of 16 fit by make_qx_quants (rmse_type 1), int8 scales, levels -32..31."""
    _qx(x, 0, 16, 16, 32, L, sc)
    amax, max_scale = F0, F0
    for j in range(16):
        if abs(sc[j]) > amax:
            amax, max_scale = abs(sc[j]), sc[j]
    if amax < GROUP_MAX_EPS:  # C zeroes the whole block
        for j in range(210):
            out[j] = 0
        for i in range(256):
            L[i] = 0
        for j in range(16):
            scale[j] = F0
        return
    iscale = _f(-128) / max_scale
    d = _store_fp16(F1 / iscale, out, 208)
    for j in range(16):
        out[192 + j] = min(127, _nearest_int(iscale * sc[j])) & 0xFF
    for j in range(16):
        s = ((np.int64(out[192 + j]) + 128) & 0xFF) - 128  # int8
        dj = d * _f(s)
        scale[j] = dj
        if dj == F0:
            continue
        for i in range(16 * j, 16 * j + 16):
            L[i] = min(max(_nearest_int(x[i] / dj), -32), 31) + 32


@njit(parallel=True, cache=True, error_model="numpy")
def _fit_all(kind, x, out, L, scale, offset):
    n = x.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        w = np.empty(32, np.float32)
        sc = np.empty(16, np.float32)
        mn = np.empty(16, np.float32)
        for b in range(c * CHUNK, min(n, c * CHUNK + CHUNK)):
            xb, ob, Lb, sb, fb = x[b], out[b], L[b], scale[b], offset[b]
            if kind <= 4:
                _block32(kind, xb, ob, Lb, sb, fb)
            elif kind == 5:
                _block_iq4_nl(xb, ob, Lb, sb, w)
            elif kind == 6:
                _block_q2_k(xb, ob, Lb, sb, fb, sc, mn)
            elif kind == 7:
                _block_q3_k(xb, ob, Lb, sb, sc)
            elif kind == 8:
                _block_k4(xb, 15, _f(-1.0), 20, ob, Lb, sb, fb, sc, mn)
            elif kind == 9:
                _block_k4(xb, 31, _f(-0.5), 15, ob, Lb, sb, fb, sc, mn)
            else:
                _block_q6_k(xb, ob, Lb, sb, sc)
            _pack_codes(kind, Lb, ob)


@njit(parallel=True, cache=True, error_model="numpy")
def _pack_all(kind, L, out):
    for b in prange(L.shape[0]):
        _pack_codes(kind, L[b], out[b])


def _threads():
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def fit(kind: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """x: [n, block_size] float32 -> (blocks [n, type_size] uint8 with the round-to-nearest codes,
    codes [n, block_size] uint8, scale [n, block_size // sub] float32, offset [n, block_size // sub]);
    None where the kernel does not apply (a type it lacks, a non-finite value: the reference decides those).

        >>> blocks, codes, scale, offset = fit("q4_k", w.reshape(-1, 256))
    """
    if kind not in KINDS or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != KINDS[kind][1]:
        return None
    k, bs, ts, sub = KINDS[kind]
    x = np.ascontiguousarray(x)
    if not np.isfinite(x).all():
        return None
    n = len(x)
    out = np.zeros((n, ts), np.uint8)
    L = np.empty((n, bs), np.uint8)
    scale = np.empty((n, bs // sub), np.float32)
    offset = np.zeros((n, bs // sub), np.float32)
    with _LOCK:
        _threads()
        _fit_all(k, x, out, L, scale, offset)
    return out, L, scale, offset


def pack(kind: str, blocks: np.ndarray, L: np.ndarray) -> np.ndarray:
    """blocks: [n, type_size] uint8, L: [n, block_size] codes -> a copy of blocks holding codes L."""
    out = blocks.copy()
    with _LOCK:
        _threads()
        _pack_all(KINDS[kind][0], np.ascontiguousarray(L, dtype=np.uint8), out)
    return out
