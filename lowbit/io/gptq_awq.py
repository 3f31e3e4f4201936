"""Other tools' packed int checkpoints -> QTensor, the dequantized weights equal to the producing tool's.

GPTQ (AutoGPTQ / GPTQModel, Linear [out, in] with in_features K, out_features N, b bits, pack = 32 / b):
    qweight  int32 [K / pack, N]   code of input k in word k // pack, bits (k % pack) * b: packed down the input
    qzeros   int32 [G, N / pack]   zero point of output n in word n // pack, same bit order
    scales   fp16  [G, N]
    g_idx    int32 [K]             the group of each input column (arange(K) // group_size unless act-order)
    w[n, k] = scales[g, n] * (q[k, n] - z[g, n]),  g = g_idx[k]
  checkpoint_format "gptq_v2" stores z; "gptq" (v1, the default) stores each packed qzeros word minus
  0x11111111 (4 bits; one 1 per field), and GPTQModel reads it back by adding that word, carries and
  all: so a zero point of 0, which borrows from its neighbour in v1, still round-trips. lowbit reads v1
  the same way. (AutoGPTQ added 1 per field instead, which reads such a field as 2^b.)
  Act-order (desc_act) checkpoints, whose g_idx is not arange(K) // group_size, have groups that are not
  contiguous runs of inputs: gptq_weight returns their dequantized float32 weight instead of a QTensor.
AWQ (AutoAWQ GEMM, always 4 bits): qweight int32 [K, N / 8] packed along the output: nibble i of word j
holds output 8j + AWQ_ORDER[i]; qzeros int32 [K / group, N / 8] the same; scales fp16 [K / group, N];
    w[n, k] = scales[k // group, n] * (q[k, n] - z[k // group, n])   (no offset on z).
"""
from __future__ import annotations

import torch

from ..core import QTensor, Scheme
from ..core.granularity import PerChannel, PerGroup
from ..core.packing import pack_bits_le, unpack_bits_le

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8j + AWQ_ORDER[i]
BITS = (2, 4, 8)


def unpack_int32_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 [rows, W], each row a little-endian bit stream of b-bit codes LSB first -> uint8 [rows, n]."""
    rows = words.shape[0]
    stream = words.contiguous().view(torch.uint8).reshape(rows, -1)
    need = -(-n * bits // 8)
    return unpack_bits_le(stream[:, :need].reshape(-1), bits, rows * need * 8 // bits).reshape(rows, -1)[:, :n]


def int_qtensor(u: torch.Tensor, shape: tuple[int, int], z: torch.Tensor, s: torch.Tensor, bits: int,
                group: int | None) -> QTensor:
    """Unsigned codes u packed as pack_bits_le packs them (flat uint8, row-major [N, K]), integer zero
    points z and scales s: [N, G] (float) -> QTensor with w = (u - z) * s: symmetric int when every z is
    2^(b-1) (GPTQ sym=True; the codes then only flip their sign bits), else affine."""
    g = PerGroup(group) if group is not None else PerChannel(0)
    s = s.contiguous() if group is not None else s.reshape(-1).contiguous()
    z = z if group is not None else z.reshape(-1)
    if bool((z == 2 ** (bits - 1)).all()):
        scheme = Scheme(f"int{bits}", g, scale_format=_scale_format(s))
        return QTensor(u ^ sign_bits(bits), tuple(shape), scheme, scales=s)
    scheme = Scheme(f"uint{bits}", g, symmetric=False, range="minmax", scale_format=_scale_format(s),
                    integer_zero=True)
    return QTensor(u, tuple(shape), scheme, scales=s, zeros=z.to(s.dtype).contiguous())


def sign_bits(bits: int) -> int:
    """A byte with the top bit of each `bits`-wide field set (0x88 for 4 bits): u - 2^(b-1) in two's
    complement is u with that bit flipped."""
    return sum(1 << (i + bits - 1) for i in range(0, 8, bits))


def row_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, W] whose rows are whole bit streams -> their bytes, flat uint8 (little-endian)."""
    return words.contiguous().view(torch.uint8).reshape(-1)


def _scale_format(s: torch.Tensor) -> str:
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    if s.dtype not in names:
        raise ValueError(f"scales of dtype {s.dtype}: expected float16, bfloat16 or float32")
    return names[s.dtype]


def gptq_weight(t: dict[str, torch.Tensor], bits: int, group_size: int, v1: bool,
                where: str) -> QTensor | torch.Tensor:
    """t: qweight, qzeros, scales (g_idx optional) of one GPTQ Linear -> QTensor [N, K], or for act-order
    groups the dequantized float32 weight [N, K]."""
    qweight, qzeros, scales = (_take(t, k, where) for k in ("qweight", "qzeros", "scales"))
    _expect(where, "qweight", qweight, tuple(qweight.shape), torch.int32)  # pack_dtype other than int32: not read
    pack = 32 // bits
    K, N = qweight.shape[0] * pack, qweight.shape[1]
    group = group_size if group_size > 0 else K
    G = -(-K // group)
    _expect(where, "scales", scales, (G, N), None)
    _expect(where, "qzeros", qzeros, (G, -(-N // pack)), torch.int32)
    g_idx = t.get("g_idx")
    if g_idx is not None:
        _expect(where, "g_idx", g_idx, (K,), None)
        if bool((g_idx < 0).any()) or bool((g_idx >= G).any()):
            raise ValueError(f"{where}.g_idx: group indices must lie in [0, {G})")
    if v1:
        qzeros = _add_words(qzeros, sum(1 << (i * bits) for i in range(32 // bits)))
    z = unpack_int32_rows(qzeros, bits, N).t().to(torch.int16)  # [N, G]
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(K) // group):
        g = g_idx.long()
        q = unpack_int32_rows(qweight.t(), bits, K)  # [N, K]
        return (q.to(torch.int16) - z[:, g]).float() * scales.t().float()[:, g]
    # each output's K codes, packed down the input, are one LSB-first stream: lowbit's row layout
    return int_qtensor(row_bytes(qweight.t()), (N, K), z, scales.t(), bits, group if group_size > 0 else None)


def _add_words(words: torch.Tensor, c: int) -> torch.Tensor:
    """int32 words + c modulo 2^32 (GPTQModel's v1 -> v2 zero-point conversion)."""
    w = (words.long() & 0xFFFFFFFF) + c
    w = w & 0xFFFFFFFF
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def awq_qtensor(t: dict[str, torch.Tensor], group_size: int, where: str) -> QTensor:
    """t: qweight, qzeros, scales of one AutoAWQ GEMM Linear -> QTensor [N, K]."""
    qweight, qzeros, scales = (_take(t, k, where) for k in ("qweight", "qzeros", "scales"))
    _expect(where, "qweight", qweight, tuple(qweight.shape), torch.int32)
    K, N = qweight.shape[0], qweight.shape[1] * 8
    G = -(-K // group_size)
    _expect(where, "scales", scales, (G, N), None)
    _expect(where, "qzeros", qzeros, (G, N // 8), torch.int32)
    inverse = torch.tensor([AWQ_ORDER.index(c) for c in range(8)])
    cols = (torch.arange(N) // 8) * 8 + inverse.repeat(N // 8)  # stream position of each output column
    q = unpack_int32_rows(qweight, 4, N)[:, cols].t()  # [N, K]
    z = unpack_int32_rows(qzeros, 4, N)[:, cols].t().to(torch.int16)  # [N, G]
    return int_qtensor(pack_bits_le(q.contiguous(), 4), (N, K), z, scales.t(), 4, group_size)


def _take(t: dict, key: str, where: str) -> torch.Tensor:
    if key not in t:
        raise ValueError(f"{where}.{key}: tensor is missing")
    return t[key]


def _expect(where: str, name: str, t: torch.Tensor, shape: tuple, dtype) -> None:
    if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype):
        want = f"{dtype} " if dtype is not None else ""
        raise ValueError(f"{where}.{name}: shape {tuple(t.shape)} {t.dtype}, expected {want}{tuple(shape)}")
