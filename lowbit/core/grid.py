"""The map between values and codes for one part [G, L] given its scales.

    symmetric:  code = format.encode(x / s)          x' = decode(code) * s
    affine:     q = clamp(round(x / s + z))          x' = (q - z) * s
"""
from __future__ import annotations

import torch

from .. import kernels
from ..formats import Format, IntFormat
from .granularity import GroupView
from .packing import pack_bits_le, packed_nbytes
from .rounding import stochastic_codes

# Elements per chunk in encode_packed: 1 MiB of float32, so a chunk and its temporaries stay
# in cache while few enough chunks keep the per-op overhead small.
CHUNK = 1 << 18


def encode_part(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, fmt: Format,
                rounding: str = "nearest", generator: torch.Generator | None = None) -> torch.Tensor:
    """x: [G, L], s and z: [G, 1] -> codes [G, L]."""
    y = x / s
    if z is not None:
        y += z
    if rounding == "stochastic":
        return stochastic_codes(y, fmt, generator)
    fast = kernels.encode_nearest(y, fmt)  # None where no fast path applies
    if fast is not None:
        return fast
    if isinstance(fmt, IntFormat):
        q = torch.round(y if fmt.step == 1.0 else y / fmt.step)
        return fmt.encode_integers(torch.clamp(q, fmt.qmin, fmt.qmax))
    return fmt.encode(y, saturate=True)


def encode_packed(view: GroupView, parts: list[torch.Tensor], s_cols: list[torch.Tensor],
                  z_cols: list[torch.Tensor | None], fmt: Format, bits: int, rounding: str = "nearest",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Parts [G_i, L_i] of a GroupView with scales [G_i, 1] -> packed codes (pack_bits_le layout).

    When the one part's rows tile the tensor in order, rows are encoded and packed a
    chunk at a time, so every pass over the values runs in cache; the result is the
    same bytes as encoding everything, merging and packing.
    """
    if rounding != "nearest" or not view.row_major or len(parts) != 1 or bits > 8:
        codes = [encode_part(p, s, z, fmt, rounding, generator) for p, s, z in zip(parts, s_cols, z_cols)]
        return pack_bits_le(view.merge(codes).contiguous(), bits)
    x, s, z = parts[0], s_cols[0], z_cols[0]
    G, L = x.shape
    rows = max(8, CHUNK // L // 8 * 8)  # a multiple of 8 rows ends every chunk on a byte
    out = torch.empty(packed_nbytes(G * L, bits), dtype=torch.uint8)
    for i in range(0, G, rows):
        j = min(G, i + rows)
        codes = encode_part(x[i:j], s[i:j], None if z is None else z[i:j], fmt)
        start = i * L * bits // 8
        out[start: start + packed_nbytes((j - i) * L, bits)] = pack_bits_le(codes, bits)
    return out


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
