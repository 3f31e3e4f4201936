"""Learned codebooks: 1-D k-means (Lloyd) over many groups at once.

Seeded k-means++ initialisation, then Lloyd steps; every group is fitted in
the same tensor operations, so a per-group codebook costs no Python loop over
groups. The same seed and input always give the same codebook.
"""
from __future__ import annotations

import torch

from .codebook import CodebookFormat


def fit_centroids(x: torch.Tensor, k: int, *, seed: int = 0, iters: int = 30, init: str = "kmeans++") -> torch.Tensor:
    """x: [G, L] -> sorted centroids [G, k] minimising squared error in each row.

    init: "kmeans++" (seeded) or "linear": k points evenly spaced over [min, max] of each row,
    which Deep Compression (Han et al., 2016) found best because it keeps centroids on the rare
    large weights that density-based starts (random, k-means++) leave without one."""
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"fit_centroids needs x of shape [groups, length>0], got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if init not in ("kmeans++", "linear"):
        raise ValueError(f"fit_centroids init={init!r}: choose 'kmeans++' or 'linear'")
    x = x.float()
    c = linear_centroids(x, k) if init == "linear" else _kmeans_pp(x, k, torch.Generator().manual_seed(seed))
    for _ in range(iters):
        c, _ = torch.sort(c, dim=1)
        idx = assign(x, c)
        sums = torch.zeros_like(c).scatter_add_(1, idx, x)
        counts = torch.zeros_like(c).scatter_add_(1, idx, torch.ones_like(x))
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)  # empty cluster keeps its centroid
        if torch.equal(new, c):
            break
        c = new
    return torch.sort(c, dim=1)[0]


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest sorted centroid for each element: x [G, L], centroids [G, k]."""
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), x.contiguous())


def linear_centroids(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: [G, L] -> [G, k] evenly spaced from each row's min to its max (k = 1: the midpoint)."""
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    t = torch.linspace(0, 1, k, dtype=x.dtype) if k > 1 else torch.full((1,), 0.5, dtype=x.dtype)
    return lo + (hi - lo) * t


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    G, L = x.shape
    rows = torch.arange(G)
    first = torch.randint(L, (G,), generator=gen)
    c = x[rows, first].unsqueeze(1)
    d2 = (x - c) ** 2
    for _ in range(1, k):
        w = d2 + 1e-30  # all-equal rows still sample
        pick = torch.multinomial(w / w.sum(1, keepdim=True), 1, generator=gen).squeeze(1)
        nc = x[rows, pick].unsqueeze(1)
        c = torch.cat([c, nc], dim=1)
        d2 = torch.minimum(d2, (x - nc) ** 2)
    return c


def kmeans(x: torch.Tensor, bits: int, *, seed: int = 0, iters: int = 30) -> CodebookFormat:
    """A learned codebook of 2^bits values fitted to all of x (one per tensor)."""
    c = fit_centroids(x.reshape(1, -1), 2**bits, seed=seed, iters=iters)[0]
    return CodebookFormat(f"kmeans{bits}", c.unique(), bits=bits)
