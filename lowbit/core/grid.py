"""The map between values and codes for one part [G, L] given its scales.

    symmetric:  code = format.encode(x / s)          x' = decode(code) * s
    affine:     q = clamp(round(x / s + z))          x' = (q - z) * s
"""
from __future__ import annotations

import torch

from ..formats import Format, IntFormat
from .rounding import stochastic_codes


def encode_part(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, fmt: Format,
                rounding: str = "nearest", generator: torch.Generator | None = None) -> torch.Tensor:
    """x: [G, L], s and z: [G, 1] -> codes [G, L]."""
    y = x / s
    if z is not None:
        y = y + z
    if rounding == "stochastic":
        return stochastic_codes(y, fmt, generator)
    if isinstance(fmt, IntFormat):
        q = torch.round(y if fmt.step == 1.0 else y / fmt.step)
        return fmt.encode_integers(torch.clamp(q, fmt.qmin, fmt.qmax))
    return fmt.encode(y, saturate=True)


def decode_part(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, fmt: Format) -> torch.Tensor:
    """codes: [G, L], s and z: [G, 1] -> float32 values [G, L]."""
    v = fmt.decode(codes)
    if z is not None:
        v = v - z
    return v * s


def grid_bounds(s: torch.Tensor, z: torch.Tensor | None, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest value each group can represent."""
    lo, hi = fmt.min, fmt.max
    if z is not None:
        return (lo - z) * s, (hi - z) * s
    return lo * s, hi * s
