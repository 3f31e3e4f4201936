"""Attention over a quantized KV prefix read as packed codes (numba): dot products of queries with
code rows and weighted sums of code rows, the affine statistics folded in outside the loops.

Codes are token-major [T, B, H, D] packed little-endian at 2, 4 or 8 bits (lowbit's KV cache,
methods/kivi.py): byte k of a row holds the codes of dims k * n + m, m < n = 8 / bits. A code
stands for x = lut[code] (the format's decode table: the integer itself for uintN, e4m3's value
for fp8); the cached value is (x - z) * s with its group's statistics. Vectors that meet a row
come "split by byte": v[m, k] = v[k * n + m], so every inner loop runs over whole bytes and
vectorizes: each row is decoded once into a per-thread buffer in that order, then met by every
query of its KV head. The callers (nn/kv_attention.py) fold the statistics in with the affine algebra:

    keys per channel (s, z per dim over G tokens):  q . K_t = sum_d (q s)_d x_td - sum_d (q s z)_d
    per token (s, z per group j of G dims):         q . K_t = sum_j s_tj (q . x_t)_j - sum_j s_tj z_tj sum_(d in j) q_d
    values per token:                                sum_t p_t V_t = sum_t (p_t s_tj) x_t - sum_t p_t s_tj z_tj

so the kernels only compute sum_d a_d x_td per group (dots) and sum_t w_tj x_td (sums). The
reference is QTensor.dequantize followed by the matmul: tests/test_kv_attention.py pins both.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

BITS = (2, 4, 8)
ROWS_PER_BLOCK = 128  # tokens per parallel work item


@njit(cache=True, inline="always")
def _decode_row(row, bits, lut, use_lut, buf):
    """One row of packed codes -> buf split by byte: buf[m * Dk + k] = x of dim k * n + m."""
    Dk = row.shape[0]
    if use_lut:
        n, mask = 8 // bits, (1 << bits) - 1
        for m in range(n):
            for k in range(Dk):
                buf[m * Dk + k] = lut[(row[k] >> (m * bits)) & mask]
    elif bits == 8:
        for k in range(Dk):
            buf[k] = np.float32(row[k])
    else:  # one simple loop per code position in the byte: each vectorizes
        mask = (1 << bits) - 1
        for m in range(8 // bits):
            shift = m * bits
            for k in range(Dk):
                buf[m * Dk + k] = np.float32((row[k] >> shift) & mask)


@njit(parallel=True, fastmath=True, cache=True)
def _dots(codes, bits, lut, use_lut, a, s, sz, qbias, G, per_channel, out):
    """out[b, h, r, t] = q . K_t from the codes (a split by byte, flat).
    Per channel: a = q s [B, H, T / G, R, D], qbias = sum_d q s z [B, H, T / G, R]; g = t // G.
    Per token: a = q [B, H, 1, R, D], s and sz = s z [T, B, H, J], qbias = sum_(d in j) q [B, H, R, J]."""
    B, H, _, R, D = a.shape
    T = out.shape[3]
    J = s.shape[3]
    n = 8 // bits
    Dk = D // n
    kj = Dk // J  # bytes per group along D
    for blk in prange((T + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK):
        buf = np.empty(D, np.float32)
        for t in range(blk * ROWS_PER_BLOCK, min(T, (blk + 1) * ROWS_PER_BLOCK)):
            g = t // G if per_channel else 0
            for b in range(B):
                for h in range(H):
                    base = ((t * B + b) * H + h) * Dk
                    _decode_row(codes[base:base + Dk], bits, lut, use_lut, buf)
                    if not per_channel:
                        for j in range(J):
                            sj = s[t, b, h, j]
                            for m in range(n):
                                for k in range(m * Dk + j * kj, m * Dk + (j + 1) * kj):
                                    buf[k] *= sj
                    for r in range(R):
                        ar = a[b, h, g, r]
                        acc = np.float32(0.0)
                        for d in range(D):
                            acc += ar[d] * buf[d]
                        if per_channel:
                            acc -= qbias[b, h, g, r]
                        else:
                            for j in range(J):
                                acc -= sz[t, b, h, j] * qbias[b, h, r, j]
                        out[b, h, r, t] = acc


@njit(parallel=True, fastmath=True, cache=True)
def _sums(codes, bits, lut, use_lut, p, s, z, parts, corr):
    """Per block of tokens: parts[blk, b, h, r, :] = sum_t p[b, h, r, t] s[t, b, h, j] x[t, b, h, :] (split
    by byte, flat; j: the group along D of each dim) and corr[blk, b, h, r, j] = sum_t p s z."""
    B, H, R, T = p.shape
    J = s.shape[3]
    D = parts.shape[4]
    n = 8 // bits
    Dk = D // n
    kj = Dk // J
    for blk in prange(parts.shape[0]):
        buf = np.empty(D, np.float32)
        for t in range(blk * ROWS_PER_BLOCK, min(T, (blk + 1) * ROWS_PER_BLOCK)):
            for b in range(B):
                for h in range(H):
                    base = ((t * B + b) * H + h) * Dk
                    _decode_row(codes[base:base + Dk], bits, lut, use_lut, buf)
                    for r in range(R):
                        acc = parts[blk, b, h, r]
                        for j in range(J):
                            wt = p[b, h, r, t] * s[t, b, h, j]
                            corr[blk, b, h, r, j] += wt * z[t, b, h, j]
                            if J == 1:
                                for d in range(D):
                                    acc[d] += wt * buf[d]
                            else:
                                for m in range(n):
                                    for k in range(m * Dk + j * kj, m * Dk + (j + 1) * kj):
                                        acc[k] += wt * buf[k]


def _threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


def _lut_args(lut: torch.Tensor | None) -> tuple[np.ndarray, bool]:
    return (np.zeros(1, np.float32), False) if lut is None else (_np(lut), True)


def split_by_byte(v: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D] -> [..., n, D / n] with out[..., m, k] = v[..., k * n + m] (n = 8 / bits codes per byte)."""
    n = 8 // bits
    return v.unflatten(-1, (-1, n)).transpose(-1, -2)


def join_bytes(v: torch.Tensor) -> torch.Tensor:
    """Inverse of split_by_byte."""
    return v.transpose(-1, -2).flatten(-2)


def dots(codes: torch.Tensor, bits: int, lut: torch.Tensor | None, a: torch.Tensor, s: torch.Tensor,
         sz: torch.Tensor, qbias: torch.Tensor, G: int, per_channel: bool, T: int) -> torch.Tensor:
    """-> [B, H, R, T] scores (see _dots; per channel, s and sz are not read); lut None: codes stand
    for their integers."""
    B, H, _, R, _ = a.shape
    out = np.empty((B, H, R, T), np.float32)
    _threads()
    _dots(codes.numpy(), bits, *_lut_args(lut), _np(split_by_byte(a, bits).flatten(-2)), _np(s), _np(sz),
          _np(qbias), G, per_channel, out)
    return torch.from_numpy(out)


def sums(codes: torch.Tensor, bits: int, lut: torch.Tensor | None, p: torch.Tensor, s: torch.Tensor,
         z: torch.Tensor) -> torch.Tensor:
    """p: [B, H, R, T], s and z per token [T, B, H, J] -> sum_t p_t (x_t - z_t) s_t: [B, H, R, D]."""
    B, H, R, T = p.shape
    J = s.shape[3]
    D = codes.numel() // (T * B * H) * 8 // bits
    nblk = (T + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    parts = np.zeros((nblk, B, H, R, D), np.float32)
    corr = np.zeros((nblk, B, H, R, J), np.float32)
    _threads()
    _sums(codes.numpy(), bits, *_lut_args(lut), _np(p), _np(s), _np(z), parts, corr)
    out = join_bytes(torch.from_numpy(parts.sum(0)).unflatten(-1, (8 // bits, -1)))
    return out - torch.from_numpy(corr.sum(0)).repeat_interleave(D // J, dim=-1)
