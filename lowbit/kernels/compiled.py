"""Opt-in fused quantize-and-pack through torch.compile (Inductor generates one C++ loop).

Off by default: the first call in a process compiles for ~20 s, which a user quantizing one
small model would not want. Turn it on with LOWBIT_COMPILE=1 or `enable(True)`. It covers
the two hot schemes of the throughput target, from float32 or bf16 input:

    int4 / int8 symmetric absmax, groups along the last axis that divide it, fp32 scales
    fp8_e4m3 symmetric absmax per output channel (axis 0 of a 2-D weight), fp32 scales

and returns exactly what core.quantize would (tests/test_kernels.py pins it), or None.
"""
from __future__ import annotations

import os

import torch

_ENABLED = os.environ.get("LOWBIT_COMPILE") == "1"
_F8 = getattr(torch, "float8_e4m3fn", None)


def enable(flag: bool = True) -> None:
    global _ENABLED
    _ENABLED = flag


def enabled() -> bool:
    return _ENABLED


def _int_groups(x: torch.Tensor, qmax: float, bits: int):
    """x: [G, g] -> (packed codes [G * g * bits / 8], fp32 scales [G])."""
    x = x.float()
    amax = torch.maximum(-x.amin(1, keepdim=True), x.amax(1, keepdim=True))
    s = torch.where(amax > 0, amax, torch.ones_like(amax)) / qmax
    q = torch.clamp(x / s, -qmax - 1, qmax).round().to(torch.int8).view(torch.uint8)
    if bits == 4:
        q = (q & 15).view(-1, 2)
        q = q[:, 0] | (q[:, 1] << 4)
    return q.reshape(-1), s.reshape(-1)


def _fp8_rows(x: torch.Tensor):
    """x: [C, K] -> (codes [C * K], fp32 scales [C])."""
    x = x.float()
    amax = torch.maximum(-x.amin(1, keepdim=True), x.amax(1, keepdim=True))
    s = torch.where(amax > 0, amax, torch.ones_like(amax)) / 448.0
    codes = torch.clamp(x / s, -448.0, 448.0).to(_F8).view(torch.uint8)
    return codes.reshape(-1), s.reshape(-1)


_COMPILED: dict = {}


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)  # shapes that vary become dynamic after one recompile
    return _COMPILED[fn]


def quantize_fused(x: torch.Tensor, scheme):
    """(packed codes, fp32 scales in the natural stats shape) or None where this does not apply."""
    if not _ENABLED or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous() or x.dim() < 1:
        return None
    if not (scheme.symmetric and scheme.range == "absmax" and scheme.rounding == "nearest"
            and scheme.scale_format == "fp32" and scheme.double_quant is None and not scheme.tensor_scale):
        return None
    g = scheme.granularity
    kind = type(g).__name__
    if scheme.format in ("int4", "int8") and kind == "PerGroup" and g.axis in (-1, x.dim() - 1) \
            and x.shape[-1] % g.size == 0 and (g.size * (4 if scheme.format == "int4" else 8)) % 8 == 0:
        bits = int(scheme.format[3:])
        codes, s = _compiled(_int_groups)(x.reshape(-1, g.size), float(2 ** (bits - 1) - 1), bits)
        return codes, s.reshape(*x.shape[:-1], x.shape[-1] // g.size)
    if scheme.format == "fp8_e4m3" and _F8 is not None and kind == "PerChannel" and x.dim() == 2 and g.axis in (0, -2):
        codes, s = _compiled(_fp8_rows)(x)
        return codes, s
    return None
