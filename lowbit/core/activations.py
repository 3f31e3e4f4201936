"""Runtime activation quantization: fast paths for the forward pass.

Activations are quantized on every call, so these avoid QTensor and packing:
they return integer tensors and float scales ready for an integer matmul, or
the fake-quantized float tensor.

    x: [..., K] -> q: int8 [..., K], scale: [..., 1]  (per token, symmetric)
"""
from __future__ import annotations

import torch


def int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8, one scale per row of the last dimension."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                qmin: int = -128, qmax: int = 127) -> torch.Tensor:
    """Static int8 with calibrated scale (and zero point, affine). Returns integer codes as int8
    (symmetric) or the integer values as int16 (affine, before subtracting the zero point)."""
    y = x.float() / scale
    if zero is not None:
        y = y + zero
    q = torch.round(y).clamp_(qmin, qmax)
    return q.to(torch.int8) if zero is None else q.to(torch.int16)


def fake_quant_int(x: torch.Tensor, bits: int, scale: torch.Tensor | None = None,
                   zero: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize x to `bits`-bit integers: per token when scale is None (dynamic
    symmetric), else with the given static scale and optional zero point."""
    qmax = 2 ** (bits - 1) - 1
    if scale is None:
        amax = x.abs().amax(dim=-1, keepdim=True).float()
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        return (torch.round(x.float() / scale).clamp_(-qmax, qmax) * scale).to(x.dtype)
    if zero is None:
        return (torch.round(x.float() / scale).clamp_(-qmax - 1, qmax) * scale).to(x.dtype)
    q = torch.round(x.float() / scale + zero).clamp_(0, 2**bits - 1)
    return ((q - zero) * scale).to(x.dtype)


FP8_E4M3_MAX = 448.0


def fake_quant_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize x to fp8_e4m3 with one scale per token (row of the last dimension):
    scale = absmax / 448, x / scale rounded to the nearest fp8 value (torch's cast, ties to even),
    times the scale. The rule of llm-compressor's FP8_DYNAMIC scheme: compressed-tensors' CPU
    fake quantization and vLLM's dynamic per-token fp8 kernel divide by the same 448."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    q = (x.float() / scale).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)
