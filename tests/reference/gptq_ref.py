"""A plain, slow GPTQ written from the paper (Frantar et al., 2023, Algorithm 1), as an oracle.

Kept apart from lowbit/methods/gptq.py on purpose: it shares no solver code with it. From
lowbit it takes only the choice of each group's scale and zero point (core.fit_params, the
grid round-to-nearest uses), so that codes can be compared exactly. Integer grids only
(int*/uint*), weights [R, C], Hessian H = 2 X X^T / n: [C, C].

    dead inputs (H_jj == 0):  W[:, j] = 0, H_jj = 1
    H += damp * mean(diag H) * I
    U = upper Cholesky factor of H^-1             (float64, then float32 as the solver uses)
    act_order: columns in order of diag(H) descending
    for each block of B columns:
        for each column j of the block:
            q_j = clamp(round(w_j / s + z), qmin, qmax);  e = (w_j - (q_j - z) s) / U_jj
            w_k -= e U_jk   for the later columns k of the block
        W[:, after the block] -= E U[block, after the block]       (the lazy batch update)

Scales: "static" groups are fitted once from the original weights (in the original column
order, so act_order needs no group index); otherwise each group is fitted when the solve
reaches its first column, from the weights as updated so far (this oracle asks B to be a
multiple of the group size, as the paper's pseudo-code does, so a group never straddles blocks).

The float32 arithmetic is spelled out one column and one row-vector at a time; the lazy update
is one float32 matrix product per block, as the paper writes it.
"""
from __future__ import annotations

import numpy as np
import torch

from lowbit.core import Scheme, fit_params
from lowbit.core.granularity import PerChannel, PerGroup, PerTensor
from lowbit.formats import IntFormat


def inverse_hessian_factor(H: np.ndarray, damp: float) -> np.ndarray:
    """H: [C, C] float64 with dead inputs already set to 1 -> U: [C, C] upper, U^T U = (H + lam I)^-1."""
    lam = damp * np.mean(np.diag(H))
    Hinv = np.linalg.inv(H + lam * np.eye(len(H)))
    L = np.linalg.cholesky((Hinv + Hinv.T) / 2)  # lower: L L^T = Hinv
    return L.T


def group_params(W: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """W: [R, n] -> float32 scales and zero points [R, groups] (zeros 0 for a symmetric grid)."""
    p = fit_params(W, scheme)
    R = W.shape[0]
    s = p.scale_values().float().reshape(-1, 1).expand(R, 1) if isinstance(scheme.granularity, PerTensor) \
        else p.scale_values().float().reshape(R, -1)
    z = p.zero_values()
    return s, (torch.zeros_like(s) if z is None else z.float().reshape(-1, s.shape[1]).expand(s.shape))


def gptq_reference(w: torch.Tensor, H: torch.Tensor, scheme: Scheme, *, damp: float = 0.01,
                   block_size: int = 128, act_order: bool = False, static_groups: bool = False,
                   fit_on: torch.Tensor | None = None):
    """w: [R, C], H: [C, C] -> (integer levels q: [R, C] float32, scales [R, groups],
    zero points [R, groups]); w_hat = (q - z[:, j // g]) * s[:, j // g].
    fit_on: [R, C] weights to fit static group parameters on (default: w, dead inputs zeroed)."""
    fmt = scheme.fmt
    if not isinstance(fmt, IntFormat) or fmt.step != 1.0:
        raise ValueError("the reference handles plain integer grids only")
    R, C = w.shape
    g = scheme.granularity
    gs = g.size if isinstance(g, PerGroup) else C  # one scale per row (channel) or per tensor
    assert isinstance(g, (PerGroup, PerChannel, PerTensor))
    static = act_order or static_groups or not isinstance(g, PerGroup)
    if not static and block_size % gs:
        raise ValueError("dynamic groups: block_size must be a multiple of the group size")

    W = w.detach().float().clone()
    Hd = H.detach().double().numpy().copy()
    dead = np.diag(Hd) == 0
    W[:, torch.from_numpy(dead)] = 0
    for j in np.flatnonzero(dead):
        Hd[j, j] = 1.0

    ngroups = -(-C // gs)
    S = torch.zeros(R, ngroups)
    Z = torch.zeros(R, ngroups)
    if static:
        S, Z = group_params(W if fit_on is None else fit_on, scheme)

    order = np.argsort(-np.diag(H.double().numpy()), kind="stable") if act_order else np.arange(C)
    U = torch.from_numpy(inverse_hessian_factor(Hd[np.ix_(order, order)], damp)).float()
    W = W[:, torch.from_numpy(order)].clone()  # W[:, i] is original column order[i]

    Q = torch.zeros(R, C)
    for b0 in range(0, C, block_size):
        b1 = min(b0 + block_size, C)
        E = torch.zeros(R, b1 - b0)
        for i in range(b0, b1):
            j = int(order[i])  # original column index
            if not static and j % gs == 0:  # the group starts here (columns run in order)
                S[:, j // gs], Z[:, j // gs] = (t[:, 0] for t in group_params(W[:, j:j + gs], scheme))
            s, z = S[:, j // gs], Z[:, j // gs]
            x = W[:, i]
            q = torch.clamp(torch.round(x / s + z), fmt.qmin, fmt.qmax)
            e = (x - (q - z) * s) / U[i, i]
            Q[:, j] = q
            E[:, i - b0] = e
            W[:, i + 1:b1] = W[:, i + 1:b1] - e[:, None] * U[i, i + 1:b1]  # w_k -= e U_jk, k in the block
        if b1 < C:
            W[:, b1:] = W[:, b1:] - E @ U[b0:b1, b1:]
    return Q, S, Z
