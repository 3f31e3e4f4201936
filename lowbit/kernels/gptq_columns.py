"""GPTQ's column loop for one block of columns on an integer grid, with numba.

The rows of W are independent in GPTQ: column i's rounding error only moves the
later columns of the same row. So each row runs the whole block on its own, in
parallel over rows, instead of one small tensor op per column for all rows:

    for each row r (in parallel), for i in the block:
        q = clamp(rint(W[r, i] / S[r, i] + Z[r, i]), qmin, qmax)
        e = (W[r, i] - (q - Z[r, i]) * S[r, i]) / U[i, i]
        W[r, i+1:] -= e * U[i, i+1:]

the same float32 arithmetic, in the same order, as methods/gptq.py's torch loop
(which stays the reference and the fallback; tests/test_gptq.py compares them).

grid_block does the same on a GGML type's grid (methods/gptq_ggml.py with act_order: every block's
scale and offset fitted up front): the nearest of the type's levels, uniform (Q4_0..Q6_K) or not
(IQ4_NL), as gptq_ggml's _Grid.round does in torch (tests/test_gguf_calibrated.py compares them).
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

from .fused import _LOCK  # one lock for numba's thread pool, which two threads must not enter at once


@njit(parallel=True, cache=True)
def _block(W, U, S, Z, qmin, qmax, Q, E):
    R, B = W.shape
    for r in prange(R):
        for i in range(B):
            x = W[r, i]
            q = np.rint(x / S[r, i] + Z[r, i])
            q = min(max(q, qmin), qmax)
            e = (x - (q - Z[r, i]) * S[r, i]) / U[i, i]
            Q[r, i] = q
            E[r, i] = e
            for k in range(i + 1, B):
                W[r, k] -= e * U[i, k]


def int_block(W1: torch.Tensor, U1: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, qmin: int, qmax: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """W1: [R, B] float32 (updated in place), U1: [B, B], S, Z: [R, B] per-column scale and zero
    -> (integers q [R, B] float32, scaled errors E [R, B])."""
    Q = torch.empty_like(W1)
    E = torch.empty_like(W1)
    with _LOCK:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _block(W1.numpy(), U1.contiguous().numpy(), S.contiguous().numpy(), Z.contiguous().numpy(),
               np.float32(qmin), np.float32(qmax), Q.numpy(), E.numpy())
    return Q, E


@njit(parallel=True, cache=True)
def _grid_block(W, U, S, O, levels, mid, uniform, codes, E):
    R, B = W.shape
    top = levels.shape[0] - 1
    for r in prange(R):
        for i in range(B):
            x = W[r, i]
            s = S[r, i]
            o = O[r, i]
            if s != 0:  # a zero scale keeps the fit's code (every level decodes to the offset)
                u = (x - o) / s
                if uniform:
                    k = np.rint(u) - levels[0]
                    codes[r, i] = int(min(max(k, np.float32(0)), np.float32(top)))
                else:  # the first midpoint >= u, as torch.searchsorted
                    k = 0
                    while k < top and mid[k] < u:
                        k += 1
                    codes[r, i] = k
            q = s * levels[codes[r, i]] + o
            e = (x - q) / U[i, i]
            E[r, i] = e
            for k in range(i + 1, B):
                W[r, k] -= e * U[i, k]


def grid_block(W1: torch.Tensor, U1: torch.Tensor, S: torch.Tensor, O: torch.Tensor, levels: np.ndarray,
               uniform: bool, codes: np.ndarray) -> torch.Tensor:
    """W1: [R, B] float32 (updated in place), U1: [B, B], S, O: [R, B] each column's scale and offset,
    levels: [k] float32 ascending, codes: [R, B] uint8 (the fit's; replaced in place where the scale is
    not 0) -> the scaled errors E [R, B]."""
    E = torch.empty_like(W1)
    lv = np.ascontiguousarray(levels, dtype=np.float32)
    mid = ((lv[1:] + lv[:-1]) / np.float32(2)).astype(np.float32)
    with _LOCK:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _grid_block(W1.numpy(), U1.contiguous().numpy(), S.contiguous().numpy(), O.contiguous().numpy(), lv, mid,
                    bool(uniform), codes, E.numpy())
    return E
