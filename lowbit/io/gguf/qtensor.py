"""GGML block types that a lowbit Scheme holds exactly: their blocks as QTensors, for
load_gguf(path, keep_quantized=True), and QTensors as blocks, for save_gguf (join_blocks).

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

Writing (join_blocks) goes the other way for any 2-D QTensor a lowbit recipe made, so a file keeps
the codes GPTQ or AWQ chose: int8 / int4 / int5 with one scale per 32 values of a row (groups of 32,
64, ..., or one per row or tensor, repeated over its blocks) is q8_0 / q4_0 / q5_0 when every scale
is an fp16 value; uint4 / uint5 affine is q4_1 / q5_1 when also every -z * s is an fp16 value
(ggml adds a stored minimum m, d q + m, where lowbit subtracts a zero point, (q - z) s; with
integer zeros that holds for 36-39% of the blocks of a SmolLM2 w4g32 layer, so such a tensor
almost never has an exact block type). The blocks
are kept only when ggml's dequantizer gives every value the same float32 as QTensor.dequantize().
"""
from __future__ import annotations

import numpy as np
import torch

from ...core.ggml_blocks import _f16_bytes, _pack_fifth_bits, _pack_nibbles, dequantize_rows
from ...core.granularity import GroupView, PerGroup
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


# lowbit format -> the GGML type whose blocks hold it: symmetric d * q, or affine d * q + m
_JOINED = {"int8": "q8_0", "int4": "q4_0", "int5": "q5_0", "uint4": "q4_1", "uint5": "q5_1"}


def join_blocks(q: QTensor) -> tuple[str, np.ndarray] | None:
    """(GGML type name, uint8 blocks [rows, bytes]) holding the 2-D QTensor `q` exactly: the inverse
    of split_blocks, for every int8/int4/int5 (symmetric) or uint4/uint5 (affine) scheme whose scales
    (and zero points) are constant over each 32 values of a row and fit the block's fp16 fields;
    None when no GGML type holds q exactly (the caller rounds its values again)."""
    kind = _JOINED.get(q.scheme.format)
    affine = kind in ("q4_1", "q5_1")
    if kind is None or len(q.shape) != 2 or q.shape[1] % BLOCK or q.codebook is not None \
            or (q.zeros is not None) != affine:
        return None
    d = _per_block(q, q.scale_values())
    m = _per_block(q, q.zero_values()) if affine else None
    if d is None or (affine and m is None):
        return None
    if affine:
        m = -(m.astype(np.float64) * d)  # ggml's d q + m is lowbit's (q - z) d when m = -z d exactly
    if not (_is_f16(d) and (m is None or _is_f16(m))):
        return None
    blocks = _pack(kind, q.unpack_codes().numpy().reshape(-1, BLOCK), d.reshape(-1, 1),
                   None if m is None else m.reshape(-1, 1)).reshape(q.shape[0], -1)
    same = np.array_equal(dequantize_rows(blocks, kind, q.shape[1]), q.dequantize().numpy())
    return (kind, blocks) if same else None


def _per_block(q: QTensor, stats: torch.Tensor) -> "np.ndarray | None":
    """Per-group statistics (scales or zero points) as one float32 value per 32 values of a row
    [rows, in // 32], or None where a block of 32 spans two values."""
    view = GroupView(q.shape, q.scheme.granularity)
    ones = [torch.ones_like(p, dtype=torch.float32) for p in view.parts(torch.zeros(q.shape))]
    each = view.merge([s * o for s, o in zip(view.split_stats(stats.float()), ones)])
    each = each.reshape(q.shape[0], -1, BLOCK)
    if not torch.equal(each, each[..., :1].expand_as(each)):
        return None
    return each[..., 0].numpy()


def _is_f16(x: np.ndarray) -> bool:
    return bool(np.all(x.astype(np.float16).astype(np.float64) == x))


def _pack(kind: str, codes: np.ndarray, d: np.ndarray, m: "np.ndarray | None") -> np.ndarray:
    """codes [blocks, 32] (lowbit's, one per byte), d and m [blocks, 1] -> [blocks, type size] uint8."""
    head = [_f16_bytes(d)] + ([] if m is None else [_f16_bytes(m.astype(np.float32))])
    if kind == "q8_0":
        return np.concatenate(head + [codes], axis=1)  # int8 codes are two's complement bytes
    q = codes ^ {"q4_0": 8, "q5_0": 16}.get(kind, 0)  # ggml's q - 8 (q - 16) is lowbit's signed code
    fifth = [_pack_fifth_bits(q)] if kind in ("q5_0", "q5_1") else []
    return np.concatenate(head + fifth + [_pack_nibbles(q & 0x0F)], axis=1)
