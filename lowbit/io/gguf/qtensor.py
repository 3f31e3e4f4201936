"""GGML block types that a lowbit Scheme holds exactly: their blocks as QTensors, for
load_gguf(path, keep_quantized=True).

    q4_0  value = d * (q - 8), q in 0..15, fp16 d per 32  ->  Scheme("int4", PerGroup(32), scale_format="fp16")
    q8_0  value = d * q, q int8, fp16 d per 32             ->  Scheme("int8", PerGroup(32), scale_format="fp16")

    q4_k  value = d sc q - dmin m, q in 0..15, per 32: 6-bit sc and m; fp16 d, dmin per 256
          ->  Scheme("uint4", PerGroup(32), symmetric=False, range="minmax"): float32 scales d sc
              (exact: 11 x 6 bits) and zeros dmin m / (d sc)

q4_0 and q8_0 are symmetric with one fp16 scale per 32 values of a row, as these schemes are. lowbit's int4
code for q - 8 is its 4-bit two's complement, q ^ 8; int8 codes are the bytes themselves. Scales
are kept as stored, negative ones included (ggml's q4_0 quantizer sets d = signed absmax / -8), so
every weight dequantizes to the same float32 product d * (q - 8) or d * q that ggml's reference
dequantizer computes: bit for bit.

q4_k is the type llama.cpp's Q4_K_M files hold most of their weights in, so it is kept too, though
not bit for bit: lowbit's affine schemes subtract a zero point in code units, (q - z) * s, and
z = dmin m / (d sc) is a float32 quotient, so a value may differ from ggml's d sc q - dmin m by a
few float32 roundings (tests/test_gguf_keep_quantized.py bounds it). Its float32 scales and zeros
take 6.0 bits per weight against the file's 4.5. A tensor with a sub-block of sc = 0 and m > 0
(a constant block that (q - z) * s cannot hold) loads as float.

The other types have no scheme: q4_1/q5_1 add an fp16 minimum per 32 (kept as q4_k is, they would
gain little over it), the other k-quants nest sub-block scales over 3-, 5- or 6-bit codes, which
qmatmul does not read (4- and 8-bit codes), nor q5_0's int5.
"""
from __future__ import annotations

import numpy as np
import torch

from ...core.granularity import PerGroup
from ...core.packing import pack_bits_le
from ...core.qtensor import QTensor
from ...core.scheme import Scheme

BLOCK = 32
SCHEMES = {
    "q4_0": Scheme("int4", PerGroup(BLOCK), scale_format="fp16"),
    "q8_0": Scheme("int8", PerGroup(BLOCK), scale_format="fp16"),
    "q4_k": Scheme("uint4", PerGroup(BLOCK), symmetric=False, range="minmax"),
}
_TYPE_SIZE = {"q4_0": 2 + BLOCK // 2, "q8_0": 2 + BLOCK, "q4_k": 144}
_VALUES = {"q4_0": BLOCK, "q8_0": BLOCK, "q4_k": 256}  # values per block


def split_blocks(blocks: np.ndarray, type_name: str, shape: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray, "np.ndarray | None"] | None:
    """uint8 blocks of a [out, in] tensor (rows of blocks, as the file stores them) -> (lowbit codes
    [out, in] uint8, one per value; scales [out, in // 32], fp16 as stored (q4_0, q8_0) or float32
    (q4_k); zeros [out, in // 32] float32 (q4_k) or None), or None where q4_k has a block its scheme
    cannot hold. Rows stay independent, so callers may reorder the rows of all three (q/k un-permuting)."""
    out, n = shape
    size, per = _TYPE_SIZE[type_name], _VALUES[type_name]
    if n % per or blocks.size != out * (n // per) * size:
        raise ValueError(f"{type_name} blocks of {blocks.size} bytes do not hold a [{out}, {n}] tensor")
    b = np.ascontiguousarray(blocks).reshape(-1, size)
    if type_name == "q4_k":
        return _split_q4_k(b, out, n)
    scales = b[:, :2].copy().view(np.float16).reshape(out, n // BLOCK)
    q = b[:, 2:]
    if type_name == "q4_0":
        # byte j of a block holds value j (low nibble) and value j + 16 (high nibble)
        q = np.concatenate([q & 0x0F, q >> 4], axis=1) ^ 8
    return np.ascontiguousarray(q).reshape(out, n), scales, None


def _split_q4_k(b: np.ndarray, out: int, n: int):
    """[blocks, 144] q4_k blocks: fp16 d, fp16 dmin, 12 bytes of eight 6-bit (sc, m), 128 bytes of codes."""
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    k = b[:, 4:16]
    # sub-blocks 0-3: the low 6 bits of bytes 0-3 (sc) and 4-7 (m); 4-7: a nibble of bytes 8-11
    # below the top 2 bits of bytes 0-3 (sc) and 4-7 (m)
    sc = np.concatenate([k[:, 0:4] & 63, (k[:, 8:12] & 0x0F) | ((k[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([k[:, 4:8] & 63, (k[:, 8:12] >> 4) | ((k[:, 4:8] >> 6) << 4)], axis=1)
    scales = d * sc.astype(np.float32)  # exact in float32, as ggml's d * sc
    mins = dmin * m.astype(np.float32)
    if ((scales == 0) & (mins != 0)).any():
        return None
    zeros = np.divide(mins, scales, out=np.zeros_like(mins), where=scales != 0)
    # each 32 bytes of codes: values 0-31 of a 64-value chunk in the low nibbles, 32-63 in the high
    qs = b[:, 16:].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(out, n)
    return q, scales.reshape(out, n // BLOCK), zeros.reshape(out, n // BLOCK)


def to_qtensor(codes: np.ndarray, scales: np.ndarray, type_name: str, zeros: "np.ndarray | None" = None) -> QTensor:
    """split_blocks' (codes, scales, zeros) -> a QTensor of SCHEMES[type_name] (codes packed in lowbit's layout)."""
    scheme = SCHEMES[type_name]
    packed = pack_bits_le(torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8)), scheme.bits)
    z = None if zeros is None else torch.from_numpy(np.ascontiguousarray(zeros))
    return QTensor(packed, tuple(codes.shape), scheme, scales=torch.from_numpy(np.ascontiguousarray(scales)), zeros=z)
