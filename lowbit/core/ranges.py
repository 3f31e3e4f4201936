"""Range rules: the interval [lo, hi] each group's grid should cover.

absmax (symmetric) and minmax (affine) take the full range; percentile clips
to a rank of the values. The MSE rule searches shrink ratios of the full
range and lives in quantize.py because it needs the quantizer itself.
"""
from __future__ import annotations

import math

import torch


def full_range(x: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [G, L] -> lo, hi: [G, 1]."""
    # max |x| is max(-min, max): two reductions, no temporary as large as x.
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    if symmetric:
        amax = torch.maximum(-lo, hi).abs()  # abs: +0.0 for an all-zero group, as |x| gives
        return -amax, amax
    return lo, hi


def percentile_range(x: torch.Tensor, symmetric: bool, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-rank percentile p of |x| (symmetric) or of x at both ends (affine)."""
    n = x.shape[1]
    k_hi = max(1, min(n, math.ceil(p / 100.0 * n)))
    if symmetric:
        amax = torch.kthvalue(x.abs(), k_hi, dim=1, keepdim=True).values
        return -amax, amax
    k_lo = max(1, min(n, n + 1 - k_hi))
    lo = torch.kthvalue(x, k_lo, dim=1, keepdim=True).values
    hi = torch.kthvalue(x, k_hi, dim=1, keepdim=True).values
    return lo, hi


# Shrink ratios tried by the MSE rule; 1.0 first, so the search is never worse than the full range.
MSE_RATIOS = [1.0 - 0.01 * i for i in range(50)]
