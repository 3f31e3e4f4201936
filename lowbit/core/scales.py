"""Scales and zero points: choosing them from a range, and storing them in a
scale format (fp32, fp16, bf16, E8M0 codes, FP8 E4M3 codes)."""
from __future__ import annotations

import math

import torch

from .. import formats

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def store(values: torch.Tensor, scale_format: str) -> torch.Tensor:
    """Float scales (already representable) -> the tensor that holds them."""
    if scale_format in _TORCH_DTYPES:
        return values.to(_TORCH_DTYPES[scale_format])
    return formats.get(scale_format).encode(values, saturate=True)


def load(stored: torch.Tensor, scale_format: str) -> torch.Tensor:
    """The tensor that holds scales -> float32 scales."""
    if scale_format in _TORCH_DTYPES:
        return stored.float()
    return formats.get(scale_format).decode(stored)


def round_to(values: torch.Tensor, scale_format: str, what: str = "scale") -> torch.Tensor:
    """Round positive scales to the scale format, keeping them positive and finite."""
    if scale_format == "fp32":
        return values.float()
    fmt = formats.get(scale_format)
    # A scale meant to be max (NVFP4: block amax / tensor amax * 448) can land an ulp above it.
    values = torch.where((values > fmt.max) & (values <= fmt.max * (1 + 1e-5)), fmt.max, values)
    if values.numel() and float(values.max()) > fmt.max:
        raise ValueError(f"a {what} of {float(values.max()):.4g} exceeds the largest {scale_format} value "
                         f"({fmt.max:.4g}); use scale_format='fp32' or 'bf16'")
    tiny = values.clamp(min=fmt.smallest_subnormal) if what == "scale" else values
    return fmt.round(tiny)


def symmetric_scale(amax: torch.Tensor, qmax: float, scale_format: str) -> torch.Tensor:
    """Scale s with amax / s at most qmax (E8M0: the OCP MX rule). Zero ranges get s = 1."""
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    if scale_format == "e8m0":
        # OCP MX v1.0: X = 2^(floor(log2 amax) - emax of the element format); elements above
        # the format's max then saturate. The exponent is clamped to E8M0's range.
        emax = math.floor(math.log2(qmax))
        e = torch.frexp(amax)[1] - 1 - emax
        return torch.ldexp(torch.ones_like(amax), e.clamp(-127, 127).float())
    return round_to(amax / qmax, scale_format)


def affine_params(lo: torch.Tensor, hi: torch.Tensor, qmin: float, qmax: float, scale_format: str,
                  integer_zero: bool = False):
    """Scale and zero point mapping [lo, hi] onto the grid values [qmin, qmax]:
    x = (q - z) * s. A zero-width range c..c gets s = |c| (or 1) so c is exact.

    integer_zero: the GPTQ/AWQ convention: the range is widened to hold 0 and z is rounded to
    a grid integer, so 0.0 is exactly representable (the ends move by at most half a step)."""
    if integer_zero:
        lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    if scale_format not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"affine quantization stores zero points in the scale format; "
                         f"scale_format={scale_format!r} cannot hold them: use fp32, fp16 or bf16")
    width = hi - lo
    flat = width <= 0
    s = torch.where(flat, torch.where(lo != 0, lo.abs(), torch.ones_like(lo)), width / (qmax - qmin))
    s = round_to(s, scale_format)
    z = qmin - lo / s
    if integer_zero:
        z = torch.round(z).clamp_(qmin, qmax)
    return s, round_to(z, scale_format, what="zero point")
