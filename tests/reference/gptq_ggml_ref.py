"""GPTQ on a GGML type's grid written out plainly in float64, as an oracle for methods/gptq_ggml.py.

Shares no solver code with lowbit: from lowbit it takes only the type's block search (GGMLType.fit,
pinned byte for byte to llama.cpp elsewhere), which says each block's scales, offsets and levels.

    dead inputs (H_jj == 0): W[:, j] = 0, H_jj = 1;  H += damp * mean(diag H) * I
    order: columns by decreasing diag(H) (act_order, block parameters fitted up front on W), else left
    to right (each type block fitted on the updated weights when the solve reaches its first column)
    for each column j in order:
        q_j = the grid value nearest w_j:  s * levels[k] + o, k = argmin |w_j - s * levels[k] - o|
        e = (w_j - q_j) / U_jj
        w_k -= e U_jk   for every later column k          (no lazy batches: the same arithmetic)
    where U is the upper Cholesky factor of H^-1 with rows and columns in solve order (U^T U = H^-1)
"""
from __future__ import annotations

import numpy as np
import torch


def gptq_ggml_reference(w: torch.Tensor, H: torch.Tensor, t, *, damp: float = 0.01,
                        act_order: bool = False) -> np.ndarray:
    """w: [R, C], H: [C, C], t: a GGMLType -> the solved weights [R, C] float64 (grid values)."""
    W = w.detach().double().numpy().copy()
    Hd = H.detach().double().numpy().copy()
    R, C = W.shape
    bs = t.block_size
    dead = np.diag(Hd) == 0
    W[:, dead] = 0
    Hd[dead, dead] = 1.0
    Hd += damp * np.mean(np.diag(Hd)) * np.eye(C)
    order = np.argsort(-np.diag(H.double().numpy()), kind="stable") if act_order else np.arange(C)
    U = np.linalg.cholesky(np.linalg.inv(Hd[np.ix_(order, order)])).T  # in solve order
    scale, offset = np.zeros((R, C)), np.zeros((R, C))
    levels = None

    def fit(cols: slice) -> None:
        nonlocal levels
        f = t.fit(np.ascontiguousarray(W[:, cols], dtype=np.float32).reshape(-1, bs))
        n = cols.stop - cols.start
        scale[:, cols] = np.repeat(f.scale.reshape(R, -1), f.sub, axis=1).reshape(R, n)
        offset[:, cols] = np.repeat(f.offset.reshape(R, -1), f.sub, axis=1).reshape(R, n)
        levels = f.levels.astype(np.float64)

    if act_order:
        fit(slice(0, C))
    Q = np.zeros((R, C))
    for i, j in enumerate(order):
        if not act_order and j % bs == 0:
            fit(slice(j, j + bs))
        grid = scale[:, j:j + 1] * levels[None, :] + offset[:, j:j + 1]  # [R, levels]
        q = grid[np.arange(R), np.abs(W[:, j:j + 1] - grid).argmin(axis=1)]
        e = (W[:, j] - q) / U[i, i]
        later = order[i + 1:]
        W[:, later] -= np.outer(e, U[i, i + 1:])
        Q[:, j] = q
    return Q
