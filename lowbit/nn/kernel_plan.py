"""The qmatmul kernel plan of a QuantLinear's weight: which kernel reads its QTensor, and how.

The plan reads the QTensor's packed codes as stored (no repacking). Scales and zero points
stored as float32, float16 or bfloat16 are read as stored too; other scale storage (e8m0,
fp8 scales, nf4-dq's double-quantized scales, a tensor scale) and the 8-bit kernels' scales
are widened to float32 once, here, and kept by the plan (4 bytes per group).
"""
from __future__ import annotations

import torch

from ..core.granularity import PerChannel, PerGroup, PerTensor
from ..core.qtensor import QTensor
from ..kernels import qmatmul
from ..kernels.qmatmul import TABLE4, Plan

_STORED_SCALES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def plan(q: QTensor, cached: Plan | None = None) -> Plan | None:
    """The kernel plan for q, or None where no kernel covers it (or none is built).
    `cached` is returned as is while it still describes q (the same tensors)."""
    source = (q.codes, q.scales, q.zeros, q.tensor_scale)
    if cached is not None and all(a is b for a, b in zip(cached.source, source)):
        return cached
    if qmatmul.ops() is None:
        return None
    made = _make_plan(q, source)
    return made if made is not None else Plan(q.codes, q.codes, None, q.codes, 0, 0, 0, -1, 1.0, source, False)


def _make_plan(q: QTensor, source: tuple) -> Plan | None:
    s = q.scheme
    if (len(q.shape) != 2 or q.codebook is not None or q.offset is not None or q.codes.device.type != "cpu"
            or not q.codes.is_contiguous()):
        return None
    N, K = q.shape
    if N == 0 or K == 0 or s.is_learned:
        return None
    decoder, table, scale_mul = qmatmul.decoder(s.fmt)
    if decoder is None or (decoder == TABLE4 and K % 2):
        return None
    g = s.granularity
    if isinstance(g, PerGroup) and g.axis in (0, -2) and g.size % 4 == 0 and q.tensor_scale is None:
        return _row_group_plan(q, source, decoder, table, scale_mul)
    if isinstance(g, PerGroup) and g.axis in (-1, 1):
        group = g.size
    elif isinstance(g, PerChannel) and g.axis in (0, -2) or isinstance(g, PerTensor):
        group = K
    else:
        return None
    G = -(-K // group)
    if G > 1 and group % 32 and not (group == 16 and decoder == TABLE4):
        return None
    # groups of 16 read float32 scales only (the kernel takes two per 32-code step)
    scales, zeros = _scales(q, N, G, wide=decoder != TABLE4 or group == 16)
    bf16_gemv = (decoder == TABLE4 and (G == 1 or group % 32 == 0) and qmatmul.has_bf16()
                 and torch.equal(table.bfloat16().float(), table))
    return Plan(q.codes, scales, zeros, table, N, K, group, decoder, scale_mul, source, bf16_gemv=bf16_gemv,
                i8_gemv=decoder == TABLE4 and (G == 1 or group % 64 == 0) and _int_codes(table) and qmatmul.has_i8(),
                i8_gemm=_gemm_codes(s.fmt, decoder, table, scale_mul)
                if (G == 1 or group % 32 == 0) and qmatmul.has_i8() else None)


def _gemm_codes(fmt, decoder: int, table: torch.Tensor, scale_mul: float) -> qmatmul.GemmCodes | None:
    """How gemm_i8 (csrc/qgemm_i8.cpp) reads these codes as bytes u, level = (u - offset) * scale_mul
    (relative to the plan's scale_mul): integer levels (uint4, int4, fp4_e2m1 x 2, uint8, int8)
    exactly; another 4-bit codebook (nf4) or an 8-bit float (fp8) rounded to 8 bits (exact=False:
    within max|level| / 254 of each level, as fine as the activations' own rounding)."""
    if decoder == qmatmul.UINT8:
        return qmatmul.GemmCodes(qmatmul.GEMM_UINT8, None, 0.0, 1.0, True)
    if decoder == qmatmul.INT8:
        return qmatmul.GemmCodes(qmatmul.GEMM_INT8, None, 128.0, 1.0, True)
    if decoder in (qmatmul.FP8_E4M3, qmatmul.FP8_E5M2) and qmatmul.has_lut8():
        # fp8 levels span 2^-9..448 (e4m3): no byte holds them all, so the table is int8 on the
        # format's peak; that double rounding costs fp8 +0.8% perplexity on SmolLM2 (docs/benchmarks.md)
        values = fmt.decode(torch.arange(256, dtype=torch.uint8)).double()
        values = torch.where(values.isfinite(), values, torch.zeros_like(values))  # e5m2's inf/nan codes
        peak = values.abs().max().item()
        levels = (values * (127 / peak)).round()
        return qmatmul.GemmCodes(qmatmul.GEMM_LUT8, (levels + 128).to(torch.uint8), 128.0,
                                 peak / 127 / scale_mul, False)
    if decoder != TABLE4:
        return None
    t = table.double()
    for mul in (1, 2, 4):  # the smallest power of two that makes every level an integer
        levels = t * mul
        if torch.equal(levels, levels.round()) and levels.min() >= -128 and levels.max() <= 127:
            off = 0.0 if levels.min() >= 0 else 128.0
            return qmatmul.GemmCodes(qmatmul.GEMM_FOUR, (levels + off).to(torch.uint8), off, 1.0 / mul, True)
    peak = t.abs().max().item()
    if peak == 0:
        return None
    levels, gain = _byte_codebook(t / peak)
    return qmatmul.GemmCodes(qmatmul.GEMM_FOUR, (levels + 128).to(torch.uint8), 128.0, peak * gain, False)


def _byte_codebook(t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """t: 16 levels in [-1, 1] -> (integer levels in [-128, 127], gain) with levels * gain nearest
    t in the least-squares sense, no level off by more than 1/254. Scaling by 127 is not the best
    grid: over multipliers 64..127.49, each with its least-squares gain (which also removes the
    rounding's bias, an error every weight of a layer would share), nf4's rms error drops from
    1/457 to 1/583 of the peak."""
    m = torch.arange(64.0, 127.49, 0.01, dtype=torch.float64)[:, None]
    levels = (t.double() * m).round().clamp(-128, 127)  # [multipliers, 16]
    gain = (levels @ t.double()) / (levels * levels).sum(1)
    miss = levels * gain[:, None] - t.double()
    err = (miss ** 2).sum(1)
    err[miss.abs().amax(1) > 1 / 254 + 1e-12] = float("inf")  # no coarser than m = 127, which always holds
    i = int(err.argmin())
    return levels[i], float(gain[i])


def _int_codes(table: torch.Tensor) -> bool:
    """uint4 or int4 codes: what the int8-activation kernel reads."""
    u = torch.arange(16, dtype=torch.float32)
    return torch.equal(table, u) or torch.equal(table, torch.where(u < 8, u, u - 16))


def _row_group_plan(q: QTensor, source: tuple, decoder: int, table: torch.Tensor, scale_mul: float) -> Plan:
    """Output-axis groups: unit scales for the kernel, the real ones [groups, K] applied to x."""
    N, K = q.shape
    zeros = q.zero_values()
    col_scales = q.scale_values().float().reshape(K, -1).T.contiguous()  # stats shape [K, groups]
    col_zeros = None if zeros is None else zeros.float().reshape(K, -1).T.contiguous()
    return Plan(q.codes, torch.ones(N), None, table, N, K, K, decoder, scale_mul, source,
                row_group=q.scheme.granularity.size, col_scales=col_scales, col_zeros=col_zeros,
                col_shift=None if col_zeros is None else col_zeros * col_scales)


def _scales(q: QTensor, N: int, G: int, wide: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zeros as [N * G], both float32, float16 or bfloat16: the stored tensors
    themselves where they already are, else float32 values widened once (kept by the plan).
    wide: float32 whatever is stored (the 8-bit kernels read only float32 scales)."""
    fmt = q.scheme.scale_format
    plain = (not wide and not isinstance(q.scales, QTensor) and q.tensor_scale is None and fmt in _STORED_SCALES
             and q.scales.dtype == _STORED_SCALES[fmt] and (q.zeros is None or q.zeros.dtype == q.scales.dtype))
    if plain:
        return _per_row(q.scales, N, G), None if q.zeros is None else _per_row(q.zeros, N, G)
    zeros = q.zero_values()
    return _per_row(q.scale_values().float(), N, G), None if zeros is None else _per_row(zeros.float(), N, G)


def _per_row(t: torch.Tensor, N: int, G: int) -> torch.Tensor:
    t = t.reshape(-1)
    if t.numel() == 1:  # per tensor: one value for every row
        t = t.expand(N)
    return t.reshape(N * G).contiguous()
