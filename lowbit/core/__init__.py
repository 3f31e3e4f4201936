"""L1: pure tensor functions: granularity, scales, rounding, quantize/dequantize, packing, errors."""
from .error import ErrorStats, error_stats
from .granularity import GroupView, PerBlock, PerChannel, PerGroup, PerTensor, PerToken, make_granularity
from .packing import pack_bits_le, packed_nbytes, unpack_bits_le
from .qtensor import QTensor
from .quantize import fit_params, make_scheme, quantize, quantize_tensor, quantize_with
from .scheme import SCHEMES, Scheme

__all__ = ["ErrorStats", "error_stats", "GroupView", "PerBlock", "PerChannel", "PerGroup", "PerTensor",
           "PerToken", "make_granularity", "pack_bits_le", "packed_nbytes", "unpack_bits_le", "QTensor",
           "fit_params", "make_scheme", "quantize", "quantize_tensor", "quantize_with", "SCHEMES", "Scheme", "dequantize"]


def dequantize(q: QTensor, dtype=None):
    """QTensor -> float tensor (float32 unless dtype is given)."""
    import torch
    return q.dequantize(dtype or torch.float32)
