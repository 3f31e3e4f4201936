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


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 x -> bfloat16, rounded stochastically: E[result] = x, values bf16 holds stay exact.

    bf16 is the top 16 bits of the float32 pattern, so adding a uniform random integer in
    [0, 2^16) to the pattern and dropping the low 16 bits rounds up with probability
    (low bits) / 2^16, the distance to the lower neighbour over the gap. NaN and Inf pass
    through; a value within one ulp of the largest bf16 may round to Inf, as the hardware
    trick does.

        >>> stochastic_round_bf16(torch.full((4,), 1.0 + 2**-9))  # 1 or 1 + 2^-7
    """
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round_bf16: x must be float32, got {x.dtype}")
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device)
    finite = torch.isfinite(x)
    # int32 addition wraps only for NaN-range patterns, which are masked out below
    rounded = torch.bitwise_and(bits + noise, -65536)  # -65536 == 0xFFFF0000 as int32
    out = torch.where(finite, rounded, bits).view(torch.float32)
    return out.to(torch.bfloat16)  # exact: the low 16 bits are zero
