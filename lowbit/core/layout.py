"""The storage layout of a quantized tensor, without any data.

qtensor_layout(shape, scheme) is the QTensor that quantize() would return for a tensor of
`shape`, with every part (codes, scales, zeros, tensor scale, codebook, double-quantized scales)
an empty meta tensor of the right shape and dtype. Its `nbytes` is QTensor.nbytes itself, so a
memory estimate counts bytes exactly as lowbit stores them, before any weight is read:

    qtensor_layout((576, 576), SCHEMES["nf4-dq"]).nbytes   # -> 171_160
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from . import scales as scale_store
from .granularity import GroupView
from .packing import packed_nbytes
from .qtensor import QTensor
from .scheme import Scheme

_META = torch.device("meta")


@lru_cache(maxsize=None)
def stored_dtype(scale_format: str) -> torch.dtype:
    """The dtype scales and zero points are held in for `scale_format` (what scales.store returns)."""
    return scale_store.store(torch.ones(1), scale_format).dtype


def _empty(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=_META)


def qtensor_layout(shape: tuple[int, ...], scheme: Scheme) -> QTensor:
    """A QTensor of meta tensors shaped as quantize(torch.empty(shape), scheme) would hold them.

    Example: qtensor_layout((4096, 4096), Scheme("int4", PerGroup(128), scale_format="fp16")).bits_per_weight
    -> 4.125
    """
    shape = tuple(int(s) for s in shape)
    view = GroupView(shape, scheme.granularity)  # raises on a granularity the shape cannot take
    codes = _empty(packed_nbytes(math.prod(shape), scheme.bits), torch.uint8)
    stored = stored_dtype(scheme.scale_format)
    if scheme.is_learned:  # one codebook of 2^bits values per group, no scales
        return QTensor(codes, shape, scheme, codebook=_empty((*view.stats_shape, 2**scheme.bits), stored))
    scales = _empty(view.stats_shape, stored)
    zeros = None if scheme.symmetric else _empty(view.stats_shape, stored)
    tensor_scale = _empty((), torch.float32) if scheme.tensor_scale else None
    if scheme.double_quant is not None:  # QLoRA: the scales, flat, quantized again, plus their fp32 mean
        scales = qtensor_layout((math.prod(view.stats_shape),), scheme.double_quant)
        scales.offset = _empty((), torch.float32)
    return QTensor(codes, shape, scheme, scales=scales, zeros=zeros, tensor_scale=tensor_scale)
