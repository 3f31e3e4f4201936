"""GGML block types that a lowbit Scheme holds exactly: their blocks as QTensors, for
load_gguf(path, keep_quantized=True).

    q4_0  value = d * (q - 8), q in 0..15, fp16 d per 32  ->  Scheme("int4", PerGroup(32), scale_format="fp16")
    q8_0  value = d * q, q int8, fp16 d per 32             ->  Scheme("int8", PerGroup(32), scale_format="fp16")

Both are symmetric with one fp16 scale per 32 values of a row, as these schemes are. lowbit's int4
code for q - 8 is its 4-bit two's complement, q ^ 8; int8 codes are the bytes themselves. Scales
are kept as stored, negative ones included (ggml's q4_0 quantizer sets d = signed absmax / -8), so
every weight dequantizes to the same float32 product d * (q - 8) or d * q that ggml's reference
dequantizer computes: bit for bit.

The other types have no exact scheme: q4_1/q5_1 add an fp16 minimum (lowbit's affine schemes add a
zero point in code units: (q - z) * d would round differently), the k-quants nest 6- or 8-bit
sub-block scales, and q5_0 (int5 codes, exact too) has no packed-code kernel (qmatmul reads 4- and
8-bit codes), so as a QTensor it would run slower than as a float layer.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.granularity import PerGroup
from ..core.packing import pack_bits_le
from ..core.qtensor import QTensor
from ..core.scheme import Scheme

BLOCK = 32
SCHEMES = {
    "q4_0": Scheme("int4", PerGroup(BLOCK), scale_format="fp16"),
    "q8_0": Scheme("int8", PerGroup(BLOCK), scale_format="fp16"),
}
_TYPE_SIZE = {"q4_0": 2 + BLOCK // 2, "q8_0": 2 + BLOCK}


def split_blocks(blocks: np.ndarray, type_name: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 blocks of a [out, in] tensor (rows of in // 32 blocks, as the file stores them) ->
    (lowbit codes [out, in] uint8, one per value; fp16 scales [out, in // 32]).
    Rows stay independent, so callers may reorder the rows of both (q/k un-permuting)."""
    out, n = shape
    size = _TYPE_SIZE[type_name]
    if n % BLOCK or blocks.size != out * (n // BLOCK) * size:
        raise ValueError(f"{type_name} blocks of {blocks.size} bytes do not hold a [{out}, {n}] tensor")
    b = np.ascontiguousarray(blocks).reshape(-1, size)
    scales = b[:, :2].copy().view(np.float16).reshape(out, n // BLOCK)
    q = b[:, 2:]
    if type_name == "q4_0":
        # byte j of a block holds value j (low nibble) and value j + 16 (high nibble)
        q = np.concatenate([q & 0x0F, q >> 4], axis=1) ^ 8
    return np.ascontiguousarray(q).reshape(out, n), scales


def to_qtensor(codes: np.ndarray, scales: np.ndarray, type_name: str) -> QTensor:
    """split_blocks' (codes, scales) -> a QTensor of SCHEMES[type_name] (codes packed in lowbit's layout)."""
    scheme = SCHEMES[type_name]
    packed = pack_bits_le(torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8)), scheme.bits)
    return QTensor(packed, tuple(codes.shape), scheme, scales=torch.from_numpy(np.ascontiguousarray(scales)))
