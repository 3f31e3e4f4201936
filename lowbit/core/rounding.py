"""Stochastic rounding onto a format's grid: unbiased, reproducible with a generator.

A value y between neighbours lo <= y <= hi becomes hi with probability
(y - lo) / (hi - lo), so E[round(y)] = y inside the representable range.
"""
from __future__ import annotations

import torch

from ..formats import Format, IntFormat


def stochastic_codes(y: torch.Tensor, fmt: Format, generator: torch.Generator | None = None) -> torch.Tensor:
    u = torch.rand(y.shape, generator=generator, dtype=torch.float32)
    if isinstance(fmt, IntFormat):
        q = torch.floor(y / fmt.step + u)
        return fmt.encode_integers(torch.clamp(q, fmt.qmin, fmt.qmax))
    if fmt.bits > 8:
        raise ValueError(f"stochastic rounding supports formats of 8 bits or fewer, not {fmt.name!r}")
    grid = fmt.values.float()
    y = torch.clamp(y.float(), float(grid[0]), float(grid[-1]))
    i = (torch.searchsorted(grid, y, right=True) - 1).clamp(0, grid.numel() - 2)
    lo, hi = grid[i], grid[i + 1]
    up = u < (y - lo) / (hi - lo)
    return fmt.encode(torch.where(up, hi, lo), saturate=True)
