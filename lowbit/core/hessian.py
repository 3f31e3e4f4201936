"""A weight error's cost on the calibration outputs: tr(D H D^T) = ||D X||^2 * 2 / n for H = 2 X X^T / n.

One function for every solver and report that measures it (AWQ's scale search, GPTQ's never-worse-than-RTN
guard, the layer losses of the calibration report). The product D H runs in bfloat16 where the CPU multiplies
bf16 natively (AVX512-BF16, AMX: 2x the float32 rate on SmolLM2's shapes), accumulating in float32: the
inputs' rounding (2^-9 relative, unbiased) averages over the sum, so the total moves by 1e-5 to 1e-4 of itself,
far below the differences the searches rank; the elementwise product and the sum stay float32.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (oneDNN says so: AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def output_error_rows(d: torch.Tensor, H: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(D H D^T)_jj for each row j of D [out, in], H [in, in]: [out], each row's products summed in `dtype`
    (the diagonal only: the full D H D^T would cost another out x in x out)."""
    d = d.float()
    if native_bf16() and d.device.type == "cpu":
        dh = (d.bfloat16() @ H.bfloat16()).float()
    else:
        dh = d @ H.float()
    return dh.mul_(d).sum(1, dtype=dtype)


def output_error(d: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """tr(D H D^T) for D [out, in], H [in, in]: a 0-d float32 tensor."""
    return output_error_rows(d, H).sum()
