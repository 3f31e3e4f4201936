"""K-quant blocks (256 values in sub-blocks with their own quantized scales), ggml's reference
round-to-nearest search without an importance matrix, vectorized over blocks.

The search adds float32 terms in ggml's order (element by element, never pairwise as numpy's sum
does), so the chosen scales and codes equal llama-quantize's byte for byte.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)


@dataclass
class BlockFit:
    """A GGML type's parameters for n blocks, apart from the codes, so a solver (GPTQ) can pick codes on the
    type's own grid: the value at position i of block b is scale[b, s] * levels[code] + offset[b, s] with
    sub-block s = i // sub. scale/offset are float32 as dequantization computes them (fp16 d times the
    block's integer sub-scale); pack(codes) gives the stored blocks for any codes, and pack(codes) with
    the round-to-nearest codes is the type's reference quantization."""
    scale: np.ndarray  # [n, block_size // sub] float32
    offset: np.ndarray  # [n, block_size // sub] float32
    levels: np.ndarray  # [k] float32, ascending: the value of each code before scaling
    sub: int
    codes: np.ndarray  # [n, block_size] uint8: indices into levels, round to nearest's choice
    pack: Callable[[np.ndarray], np.ndarray]  # codes [n, block_size] -> [n, type_size] uint8


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2**23 in float32 and read the low 23 bits. That is round half to
    even (np.rint) for |v| < 2**22; beyond, and for inf, it wraps as the C does (release builds drop the
    assert), which Q3_K's search can reach when it divides by a tiny positive sum before clamping."""
    with np.errstate(over="ignore", invalid="ignore"):
        bits = (np.asarray(v, F32) + F32(12582912)).astype(F32).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def _first_absmax(x: np.ndarray) -> np.ndarray:
    """[..., n] -> [..., 1]: the value of largest magnitude, the first one on ties, as ggml's scan
    `if (fabsf(x) > amax)` from amax = max = 0 keeps it: NaN never wins, and +0.0 when nothing beats 0."""
    a = np.abs(x)
    a = np.where(np.isnan(a), F32(0), a)
    i = a.argmax(axis=-1)[..., None]
    return np.where(np.take_along_axis(a, i, axis=-1) > 0, np.take_along_axis(x, i, axis=-1), F32(0))


def _weighted_sums(x: np.ndarray, w: np.ndarray, l: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum(w*x*l), sum(w*l*l) over the last axis, float32, added left to right as ggml's loop does."""
    lf = l.astype(F32)
    sumlx = np.zeros(x.shape[:-1], F32)
    suml2 = np.zeros(x.shape[:-1], F32)
    for i in range(x.shape[-1]):
        sumlx = sumlx + w[..., i] * x[..., i] * lf[..., i]
        suml2 = suml2 + w[..., i] * lf[..., i] * lf[..., i]
    return sumlx, suml2


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes for rows x: [m, n] (ggml make_qx_quants, rmse_type 1: weights x**2).
    Returns (scale [m] float32, codes L [m, n] in 0 .. 2*nmax-1)."""
    mx = _first_absmax(x)
    zero = np.abs(mx[:, 0]) < GROUP_MAX_EPS
    mx = np.where(zero[:, None], F32(1), mx)
    w = x * x

    def codes(iscale):
        return np.clip(nearest_int(iscale * x), -nmax, nmax - 1)

    iscale = (F32(-nmax) / mx).astype(F32)
    l = codes(iscale)
    L = l + nmax
    sumlx, suml2 = _weighted_sums(x, w, l)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = (-(F32(nmax) + F32(0.1) * F32(step)) / mx).astype(F32)
        l = codes(iscale)
        sumlx, suml2 = _weighted_sums(x, w, l)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = (sumlx / suml2).astype(F32)
        L = np.where(better[:, None], l + nmax, L)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, scale * sumlx, best)
    scale = np.where(zero, F32(0), scale)
    L = np.where(zero[:, None], 0, L)
    return scale, L


def _fit_q6_k(x: np.ndarray) -> BlockFit:
    """[n, 256] -> blocks of [n, 210]: ql (128: low 4 bits), qh (64: high 2 bits), 16 int8 scales, fp16 d."""
    n = len(x)
    sub = x.reshape(n * 16, 16)
    scales, L = make_qx_quants(sub, 32)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    max_scale = _first_absmax(scales)[:, 0]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore"):
        iscale = np.where(empty, F32(0), F32(-128) / np.where(empty, F32(1), max_scale)).astype(F32)
        d16 = np.where(empty, F32(0), F32(1) / np.where(empty, F32(1), iscale)).astype(np.float16)
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
    d = d16.astype(F32)[:, None] * sc.astype(F32)  # [n, 16]
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int(x.reshape(n, 16, 16) / d[:, :, None]), -32, 31) + 32
    L = np.where((d != 0)[:, :, None], requant, L).reshape(n, 256)
    L = np.where(empty[:, None], 0, L).astype(np.uint8)
    sc = np.where(empty[:, None], 0, sc)
    scale = d16.astype(F32)[:, None] * sc.astype(F32)

    def pack(L):
        q = L.reshape(n, 2, 4, 32)  # [block, half of 128, quarter of 32, l]
        ql = np.concatenate([q[:, :, 0] & 0xF | (q[:, :, 2] & 0xF) << 4,
                             q[:, :, 1] & 0xF | (q[:, :, 3] & 0xF) << 4], axis=2)
        qh = (q[:, :, 0] >> 4) | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (q[:, :, 3] >> 4) << 6
        return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8),
                               d16.view(np.uint8).reshape(n, 2)], axis=1)
    return BlockFit(scale, np.zeros_like(scale), np.arange(-32, 32, dtype=F32), 16, L, pack)


def _d_q6_k(b: np.ndarray) -> np.ndarray:
    n = len(b)
    ql, qh = b[:, :128].reshape(n, 2, 64), b[:, 128:192].reshape(n, 2, 32)
    sc = b[:, 192:208].view(np.int8).astype(F32)
    d = np.ascontiguousarray(b[:, 208:210]).view(np.float16).astype(F32)
    q = np.stack([ql[:, :, :32] & 0xF | (qh & 3) << 4, ql[:, :, 32:] & 0xF | (qh >> 2 & 3) << 4,
                  ql[:, :, :32] >> 4 | (qh >> 4 & 3) << 4, ql[:, :, 32:] >> 4 | (qh >> 6 & 3) << 4], axis=2)
    q = q.reshape(n, 16, 16).astype(F32) - F32(32)
    return (d[:, :, None] * sc[:, :, None] * q).reshape(n, 256)


def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """float32 sum over the last axis, left to right (ggml's loop order)."""
    acc = np.zeros(terms.shape[:-1], F32)
    for i in range(terms.shape[-1]):
        acc = acc + terms[..., i]
    return acc


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool = False):
    """Affine codes for rows x: [m, n] with weights w (ggml make_qkx2_quants): a grid search over
    1/scale, each candidate refit by weighted least squares of scale and min, kept when its weighted
    error (squared, or absolute with use_mad as Q2_K asks) is lower.
    Returns (scale [m], min [m] (>= 0, subtracted), codes [m, n] in 0..nmax)."""
    mn = np.minimum(x.min(axis=1), F32(0))
    mx = x.max(axis=1)
    flat = mx == mn
    mn = np.where(flat, mx - F32(1), mn)  # any span > 0: flat rows are zeroed at the end
    sum_w, sum_x = _seq_sum(w), _seq_sum(w * x)

    def codes(iscale, lo):  # ggml uses the current min, which a better candidate replaces
        return np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(F32)

    def error(scale, lo, L):
        diff = scale[:, None] * L + lo[:, None] - x
        return _seq_sum(w * (np.abs(diff) if use_mad else diff * diff))

    iscale = (F32(nmax) / (mx - mn)).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    L = codes(iscale, mn)
    best = error(scale, mn, L)
    for step in range(nstep + 1):
        iscale = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)).astype(F32)
        la = codes(iscale, mn)
        wl = w * la
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * la), _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = ((sum_w * sum_xl - sum_x * sum_l) / D).astype(F32)
            this_min = ((sum_l2 * sum_x - sum_l * sum_xl) / D).astype(F32)
            clamp = this_min > 0
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale).astype(F32)
        this_min = np.where(clamp, F32(0), this_min)
        with np.errstate(invalid="ignore"):
            mad = error(this_scale, this_min, la)
        better = (D > 0) & (mad < best)
        L = np.where(better[:, None], la, L)
        best = np.where(better, mad, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, F32(0), scale)
    mn = np.where(flat, np.minimum(x.min(axis=1), F32(0)), mn)
    L = np.where(flat[:, None], F32(0), L)
    return scale, -mn, L.astype(np.uint8)


def _k4_scales(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared by Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins under fp16 d and dmin.
    x: [n, 256] -> (d16 [n], dmin16 [n], ls [n, 8], lm [n, 8], codes L [n, 256])."""
    n = len(x)
    sub = x.reshape(n * 8, 32)
    av = np.sqrt(_seq_sum(sub * sub) / F32(32)).astype(F32)
    scales, mins, L = make_qkx2_quants(sub, av[:, None] + np.abs(sub), nmax, rmin, F32(0.1), nstep)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.reshape(n, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    d16 = (max_scale / F32(63)).astype(np.float16)
    dmin16 = (max_min / F32(63)).astype(np.float16)
    d = d16.astype(F32)[:, None] * ls.astype(F32)
    dm = dmin16.astype(F32)[:, None] * lm.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int((x.reshape(n, 8, 32) + dm[:, :, None]) / d[:, :, None]), 0, nmax)
    L = np.where((d != 0)[:, :, None], requant, L).reshape(n, 256).astype(np.uint8)
    return d16, dmin16, ls.astype(np.uint8), lm.astype(np.uint8), L


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """[n, 8] 6-bit scales and mins -> [n, 12] (ggml's get_scale_min_k4 layout)."""
    out = np.zeros((len(ls), 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | (ls[:, 4:] >> 4) << 6
    out[:, 4:8] = lm[:, :4] | (lm[:, 4:] >> 4) << 6
    out[:, 8:12] = (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4
    return out


def _unpack_k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ls = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | (s[:, 0:4] >> 6) << 4], axis=1)
    lm = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | (s[:, 4:8] >> 6) << 4], axis=1)
    return ls.astype(F32), lm.astype(F32)


def _f16_pair(d16, dmin16) -> np.ndarray:
    return np.stack([d16, dmin16], axis=1).view(np.uint8).reshape(len(d16), 4)


def _k4_fit(d16, dmin16, ls, lm, L, nmax: int, pack_codes) -> BlockFit:
    head = np.concatenate([_f16_pair(d16, dmin16), _pack_k4_scales(ls, lm)], axis=1)
    scale = d16.astype(F32)[:, None] * ls.astype(F32)
    offset = -(dmin16.astype(F32)[:, None] * lm.astype(F32))
    return BlockFit(scale, offset, np.arange(nmax + 1, dtype=F32), 32, L,
                    lambda L: np.concatenate([head, pack_codes(L)], axis=1))


def _fit_q4_k(x: np.ndarray) -> BlockFit:
    """[n, 256] -> blocks of [n, 144]: d, dmin (fp16), 12 bytes of scales/mins, 128 bytes of 4-bit codes."""
    def pack_codes(L):
        q = L.reshape(len(L), 4, 2, 32)  # 64-value chunks: low nibble = first 32, high = next 32
        return (q[:, :, 0] | q[:, :, 1] << 4).reshape(len(L), 128)
    return _k4_fit(*_k4_scales(x, 15, -1.0, 20), 15, pack_codes)


def _d_q4_k(b: np.ndarray) -> np.ndarray:
    n = len(b)
    dd = np.ascontiguousarray(b[:, :4]).view(np.float16).astype(F32)
    ls, lm = _unpack_k4_scales(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 32)
    q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(n, 8, 32).astype(F32)
    return ((dd[:, :1] * ls)[:, :, None] * q - (dd[:, 1:] * lm)[:, :, None]).reshape(n, 256)


def _fit_q5_k(x: np.ndarray) -> BlockFit:
    """[n, 256] -> blocks of [n, 176]: d, dmin, 12 bytes of scales/mins, 32 bytes of 5th bits, 128 of low nibbles."""
    def pack_codes(L):
        q = L.reshape(len(L), 4, 2, 32)
        qs = ((q[:, :, 0] & 0xF) | (q[:, :, 1] & 0xF) << 4).reshape(len(L), 128)
        hi = (q >> 4).astype(np.uint8)  # [n, chunk, half, 32]: bit (2*chunk + half) of qh[j]
        qh = np.zeros((len(L), 32), np.uint8)
        for c in range(4):
            qh |= hi[:, c, 0] << (2 * c) | hi[:, c, 1] << (2 * c + 1)
        return np.concatenate([qh, qs], axis=1)
    return _k4_fit(*_k4_scales(x, 31, -0.5, 15), 31, pack_codes)


def _d_q5_k(b: np.ndarray) -> np.ndarray:
    n = len(b)
    dd = np.ascontiguousarray(b[:, :4]).view(np.float16).astype(F32)
    ls, lm = _unpack_k4_scales(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:].reshape(n, 4, 32)
    lo = np.stack([qs & 0xF, qs >> 4], axis=2)  # [n, 4, 2, 32]
    hi = np.stack([np.stack([(qh >> (2 * c)) & 1, (qh >> (2 * c + 1)) & 1], axis=1) for c in range(4)], axis=1)
    q = (lo | hi << 4).reshape(n, 8, 32).astype(F32)
    return ((dd[:, :1] * ls)[:, :, None] * q - (dd[:, 1:] * lm)[:, :, None]).reshape(n, 256)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """[n, 256] codes < 4 -> [n, 64]: byte 32*h + l holds values 128*h + 32*k + l at bits 2k (Q2_K, Q3_K)."""
    q = L.reshape(len(L), 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(len(L), 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(len(qs), 2, 1, 32)
    return ((q >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3).reshape(len(qs), 256)


def _fit_q2_k(x: np.ndarray) -> BlockFit:
    """[n, 256] -> blocks of [n, 84]: 16 bytes of 4-bit scales (low) and mins (high), 64 bytes of
    2-bit codes, fp16 d and dmin. Sub-blocks of 16 fit by make_qkx2_quants on weights |x|, absolute error."""
    n = len(x)
    sub = x.reshape(n * 16, 16)
    scales, mins, L = make_qkx2_quants(sub, np.abs(sub), 3, -0.5, F32(0.1), 15, use_mad=True)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(15) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(15) / max_min, F32(0)).astype(F32)
    # C stores the int in a uint8 and ORs the min's nibble over it (a negative scale would wrap)
    ls, lm = nearest_int(inv_scale[:, None] * scales), nearest_int(inv_min[:, None] * mins)
    sc = ((ls | lm << 4) & 0xFF).astype(np.uint8)
    d16 = (max_scale / F32(15)).astype(np.float16)
    dmin16 = (max_min / F32(15)).astype(np.float16)
    scale = d16.astype(F32)[:, None] * (sc & 0xF).astype(F32)
    dm = dmin16.astype(F32)[:, None] * (sc >> 4).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int((x.reshape(n, 16, 16) + dm[:, :, None]) / scale[:, :, None]), 0, 3)
    L = np.where((scale != 0)[:, :, None], requant, L.reshape(n, 16, 16)).reshape(n, 256).astype(np.uint8)
    tail = _f16_pair(d16, dmin16)
    return BlockFit(scale, -dm, np.arange(4, dtype=F32), 16, L,
                    lambda L: np.concatenate([sc, _pack_2bit(L), tail], axis=1))


def _d_q2_k(b: np.ndarray) -> np.ndarray:
    n = len(b)
    sc = b[:, :16]
    dd = np.ascontiguousarray(b[:, 80:84]).view(np.float16).astype(F32)
    q = _unpack_2bit(b[:, 16:80]).reshape(n, 16, 16).astype(F32)
    dl = dd[:, :1] * (sc & 0xF).astype(F32)
    ml = dd[:, 1:] * (sc >> 4).astype(F32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, 256)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes for rows x: [m, n] (ggml make_q3_quants with do_rmse): round at -nmax/max, then up
    to 5 sweeps that move one code at a time to its least-squares value when that raises sumlx**2/suml2
    (weights x**2). The sweeps run in C order per row; rows run side by side. A sweep that changes nothing
    leaves the state as it was, so running all 5 equals C's early exit.
    Returns (scale [m] float32, codes [m, n] in 0 .. 2*nmax-1; all-zero rows get scale 0, codes 0)."""
    mx = _first_absmax(x)
    zero = np.abs(mx[:, 0]) < GROUP_MAX_EPS
    mx = np.where(zero[:, None], F32(1), mx)
    w = x * x
    iscale = (F32(-nmax) / mx).astype(F32)
    l = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
    sumlx, suml2 = _weighted_sums(x, w, l)
    for _ in range(5):
        for i in range(x.shape[1]):
            wx, wi, li = w[:, i] * x[:, i], w[:, i], l[:, i].astype(F32)
            slx = sumlx - wx * li
            sl2 = suml2 - wi * li * li
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                new_l = np.clip(nearest_int(x[:, i] * sl2 / slx), -nmax, nmax - 1)
                nl = new_l.astype(F32)
                slx = slx + wx * nl
                sl2 = sl2 + wi * nl * nl
                take = ((sumlx - wx * li > 0) & (new_l != l[:, i]) & (sl2 > 0)
                        & (slx * slx * suml2 > sumlx * sumlx * sl2))
            l[:, i] = np.where(take, new_l, l[:, i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(zero, F32(0), sumlx / suml2).astype(F32)
    return scale, np.where(zero[:, None], 0, l + nmax)


def _pack_q3_scales(l: np.ndarray) -> np.ndarray:
    """[n, 16] 6-bit scales -> [n, 12]: low nibbles of 0..7 and 8..15 share bytes 0..7, the top two bits
    of scale j sit in byte 8 + j % 4 at bit 2 * (j // 4)."""
    hi = (l >> 4).reshape(len(l), 4, 4)  # [j // 4, j % 4]
    top = hi[:, 0] | hi[:, 1] << 2 | hi[:, 2] << 4 | hi[:, 3] << 6
    return np.concatenate([(l[:, :8] & 0xF) | (l[:, 8:] & 0xF) << 4, top], axis=1).astype(np.uint8)


def _unpack_q3_scales(s: np.ndarray) -> np.ndarray:
    """[n, 12] -> [n, 16] scales as stored, 0..63 (the value is this minus 32)."""
    low = np.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=1)
    top = np.stack([(s[:, 8:12] >> (2 * g)) & 3 for g in range(4)], axis=1).reshape(len(s), 16)
    return low | top << 4


def _fit_q3_k(x: np.ndarray) -> BlockFit:
    """[n, 256] -> blocks of [n, 110]: hmask (32: bit 3 of the code), qs (64: low 2 bits), 12 bytes of
    6-bit signed scales (offset by 32), fp16 d. Sub-blocks of 16 fit by make_q3_quants, levels -4..3."""
    n = len(x)
    scales, L = make_q3_quants(x.reshape(n * 16, 16), 4)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    max_scale = _first_absmax(scales)[:, 0]
    empty = max_scale == 0
    with np.errstate(divide="ignore"):
        iscale = (F32(-32) / np.where(empty, F32(1), max_scale)).astype(F32)
        d16 = np.where(empty, F32(0), F32(1) / iscale).astype(np.float16)
    ls = np.clip(nearest_int(iscale[:, None] * scales), -32, 31) + 32
    ls = np.where(empty[:, None], 0, ls).astype(np.uint8)  # C leaves the scale bytes zeroed
    scale = d16.astype(F32)[:, None] * (ls.astype(F32) - F32(32))
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int(x.reshape(n, 16, 16) / scale[:, :, None]), -4, 3) + 4
    L = np.where((scale != 0)[:, :, None], requant, L).reshape(n, 256).astype(np.uint8)
    tail = np.concatenate([_pack_q3_scales(ls), d16.view(np.uint8).reshape(n, 2)], axis=1)

    def pack(L):
        high = (L >> 2).reshape(n, 8, 32)  # value j: hmask byte j % 32, bit j // 32
        hmask = np.zeros((n, 32), np.uint8)
        for k in range(8):
            hmask |= (high[:, k] << k).astype(np.uint8)
        return np.concatenate([hmask, _pack_2bit(L & 3), tail], axis=1)
    return BlockFit(scale, np.zeros_like(scale), np.arange(-4, 4, dtype=F32), 16, L, pack)


def _d_q3_k(b: np.ndarray) -> np.ndarray:
    n = len(b)
    hm = b[:, :32]
    high = np.stack([(hm >> k) & 1 for k in range(8)], axis=1).reshape(n, 256)
    q = (_unpack_2bit(b[:, 32:96]) | high << 2).astype(F32) - F32(4)
    d = np.ascontiguousarray(b[:, 108:110]).view(np.float16).astype(F32)
    dl = d * (_unpack_q3_scales(b[:, 96:108]).astype(F32) - F32(32))
    return (dl[:, :, None] * q.reshape(n, 16, 16)).reshape(n, 256)
