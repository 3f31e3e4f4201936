"""GGML block types (llama.cpp's tensor types): one table keyed by type name, each entry a pair of pure
numpy functions over blocks.

    t = GGML_TYPES["q4_0"]
    data = quantize_rows(w, "q4_0")          # w: [rows, n] float32 -> [rows, n // 32 * 18] uint8
    w2 = dequantize_rows(data, "q4_0", n)    # -> [rows, n] float32

A block holds `block_size` consecutive values of one row as `type_size` bytes (little-endian).
The quantizers follow ggml's round-to-nearest reference (`quantize_row_*_ref` in ggml-quants.c)
operation for operation in float32, so the bytes equal llama.cpp's and gguf-py's: a float32
product then sum rounds twice, and numpy does the same (no fused multiply-add).
Type ids are GGUF file constants (ggml.h `enum ggml_type`).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import kernels
from .ggml_kquants import (
    BlockFit,
    _d_q2_k,
    _d_q3_k,
    _d_q4_k,
    _d_q5_k,
    _d_q6_k,
    _first_absmax,
    _fit_q2_k,
    _fit_q3_k,
    _fit_q4_k,
    _fit_q5_k,
    _fit_q6_k,
)

F32 = np.float32


@dataclass(frozen=True)
class GGMLType:
    """quantize: blocks [n_blocks, block_size] float32 -> [n_blocks, type_size] uint8; dequantize: the inverse map
    back to float32 values. fit: blocks -> BlockFit (parameters and round-to-nearest codes, apart, so a solver
    such as GPTQ can choose the codes on the type's grid); None for the float types, which have no grid.
    reference_fit is the numpy definition; fit and quantize run the compiled kernel (kernels.ggml_fit) where
    it applies, byte for byte the same, and the reference elsewhere."""
    name: str
    id: int
    block_size: int
    type_size: int
    dequantize: Callable[[np.ndarray], np.ndarray]
    reference_fit: Callable[[np.ndarray], BlockFit] | None = None
    encode: Callable[[np.ndarray], np.ndarray] | None = None  # float types: values -> bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    @property
    def fit(self) -> Callable[[np.ndarray], BlockFit] | None:
        return None if self.reference_fit is None else self._fit

    def _fit(self, x: np.ndarray) -> BlockFit:
        fast = kernels.ggml_fit(self.name, x)
        if fast is None:
            return self.reference_fit(x)
        blocks, codes, scale, offset = fast
        levels, sub = _grid(self.name)
        return BlockFit(scale, offset, levels, sub, codes, lambda L: kernels.ggml_pack(self.name, blocks, L))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        if self.encode is not None:
            return self.encode(x)
        fast = kernels.ggml_fit(self.name, x)
        if fast is not None:
            return fast[0]
        f = self.reference_fit(x)
        return f.pack(f.codes)

    def quantize_reference(self, x: np.ndarray) -> np.ndarray:
        """quantize through the numpy reference alone (what the kernel is tested against)."""
        if self.encode is not None:
            return self.encode(x)
        f = self.reference_fit(x)
        return f.pack(f.codes)


@functools.cache
def _grid(name: str) -> tuple[np.ndarray, int]:
    """(levels, sub-block size) of a type, as its reference fit states them: the kernel computes only numbers."""
    t = GGML_TYPES[name]
    f = t.reference_fit(np.zeros((1, t.block_size), F32))
    return f.levels, f.sub


# -- helpers ------------------------------------------------------------------------------------------
def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """[n, 1] float32 -> [n, 2] uint8 (IEEE half, round to nearest even, as F16C's _cvtss_sh)."""
    return x.astype(np.float16).view(np.uint8).reshape(len(x), 2)


def _f16_values(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n, 1] float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(F32).reshape(len(b), 1)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d, 0 where d == 0 (ggml: `id = d ? 1.0f/d : 0.0f`)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / d).astype(F32)


def _first_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, bs] -> ([n, 1], [n, 1]): the first smallest and the first largest value, as C's `<` / `>` scans keep
    them (the sign of a zero min or max shows in Q4_1/Q5_1's m and d; numpy's min may return either zero)."""
    return (np.take_along_axis(x, x.argmin(axis=1)[:, None], axis=1),
            np.take_along_axis(x, x.argmax(axis=1)[:, None], axis=1))


def _trunc_u8(v: np.ndarray, top: int) -> np.ndarray:
    """C's `MIN(top, (int8_t)v)` for v >= 0: truncate toward zero, clamp."""
    return np.minimum(np.trunc(v), top).astype(np.uint8)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero. floor(|v| + 0.5) would be wrong for 0.49999997 (the sum rounds up)."""
    a = np.abs(v)
    f = np.floor(a)
    return np.copysign(f + (a - f >= F32(0.5)), v).astype(F32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] codes < 16 -> [n, 16]: byte j holds code j (low nibble) and code j + 16 (high nibble)."""
    h = q.shape[1] // 2
    return (q[:, :h] & 0x0F) | (q[:, h:] << 4)


def _unpack_nibbles(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b & 0x0F, b >> 4], axis=1)


def _pack_fifth_bits(q: np.ndarray) -> np.ndarray:
    """[n, 32] 5-bit codes -> [n, 4]: bit j of a little-endian uint32 is bit 4 of code j."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def _unpack_fifth_bits(b: np.ndarray) -> np.ndarray:
    return np.unpackbits(b, axis=1, bitorder="little") << 4


# -- float types ------------------------------------------------------------------------------------------
def _q_f32(x):
    return np.ascontiguousarray(x, dtype=F32).view(np.uint8)


def _d_f32(b):
    return np.ascontiguousarray(b).view(F32)


def _q_f16(x):
    return np.ascontiguousarray(x, dtype=F32).astype(np.float16).view(np.uint8)


def _d_f16(b):
    return np.ascontiguousarray(b).view(np.float16).astype(F32)


def _q_bf16(x):
    """ggml_compute_fp32_to_bf16: NaN stays a quiet NaN, everything else rounds to nearest even."""
    u = np.ascontiguousarray(x, dtype=F32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r = np.where(nan, ((u >> 16) | 64).astype(np.uint16), r)
    return r.view(np.uint8)


def _d_bf16(b):
    return (np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << 16).view(F32)


# -- 32-value blocks: q8_0, q4_0, q4_1, q5_0, q5_1 -----------------------------------------------------
def _levels(lo: int, hi: int) -> np.ndarray:
    return np.arange(lo, hi + 1, dtype=F32)


def _f16_round(d: np.ndarray) -> np.ndarray:
    """The float32 value of d as the block stores it (fp16)."""
    return d.astype(np.float16).astype(F32)


def _fit_q8_0(x):
    d = (np.abs(x).max(axis=1, keepdims=True) / F32(127)).astype(F32)
    q = round_half_away(x * _inverse(d)).astype(np.int16)
    return BlockFit(_f16_round(d), np.zeros_like(d), _levels(-128, 127), 32, (q + 128).astype(np.uint8),
                    lambda L: np.concatenate([_f16_bytes(d), (L.astype(np.int16) - 128).astype(np.int8).view(np.uint8)],
                                             axis=1))


def _d_q8_0(b):
    return _f16_values(b[:, :2]) * b[:, 2:].view(np.int8).astype(F32)


def _fit_q4_0(x):
    d = (_first_absmax(x) / F32(-8)).astype(F32)
    q = _trunc_u8(x * _inverse(d) + F32(8.5), 15)
    return BlockFit(_f16_round(d), np.zeros_like(d), _levels(-8, 7), 32, q,
                    lambda L: np.concatenate([_f16_bytes(d), _pack_nibbles(L)], axis=1))


def _d_q4_0(b):
    return _f16_values(b[:, :2]) * (_unpack_nibbles(b[:, 2:]).astype(F32) - F32(8))


def _fit_q4_1(x):
    lo, hi = _first_min_max(x)
    d = ((hi - lo) / F32(15)).astype(F32)
    q = _trunc_u8((x - lo) * _inverse(d) + F32(0.5), 15)
    return BlockFit(_f16_round(d), _f16_round(lo), _levels(0, 15), 32, q,
                    lambda L: np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(L)], axis=1))


def _d_q4_1(b):
    return _f16_values(b[:, :2]) * _unpack_nibbles(b[:, 4:]).astype(F32) + _f16_values(b[:, 2:4])


def _fit_q5_0(x):
    d = (_first_absmax(x) / F32(-16)).astype(F32)
    q = _trunc_u8(x * _inverse(d) + F32(16.5), 31)
    return BlockFit(_f16_round(d), np.zeros_like(d), _levels(-16, 15), 32, q,
                    lambda L: np.concatenate([_f16_bytes(d), _pack_fifth_bits(L), _pack_nibbles(L & 0x0F)], axis=1))


def _d_q5_0(b):
    q = _unpack_nibbles(b[:, 6:]) | _unpack_fifth_bits(b[:, 2:6])
    return _f16_values(b[:, :2]) * (q.astype(F32) - F32(16))


def _fit_q5_1(x):
    lo, hi = _first_min_max(x)
    d = ((hi - lo) / F32(31)).astype(F32)
    q = _trunc_u8((x - lo) * _inverse(d) + F32(0.5), 31)
    return BlockFit(_f16_round(d), _f16_round(lo), _levels(0, 31), 32, q,
                    lambda L: np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_fifth_bits(L),
                                              _pack_nibbles(L & 0x0F)], axis=1))


def _d_q5_1(b):
    q = _unpack_nibbles(b[:, 8:]) | _unpack_fifth_bits(b[:, 4:8])
    return _f16_values(b[:, :2]) * q.astype(F32) + _f16_values(b[:, 2:4])


# IQ4_NL: 16 non-uniform levels (ggml kvalues_iq4nl), one fp16 scale per 32 values
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=F32)


def _nearest_level(v: np.ndarray) -> np.ndarray:
    """ggml best_index_int8: index of the nearest IQ4_NL level, the upper one on ties."""
    mu = np.clip(np.searchsorted(IQ4NL_VALUES, v, side="right"), 1, 15)
    lower = (v - IQ4NL_VALUES[mu - 1]) < (IQ4NL_VALUES[mu] - v)
    return np.where(lower, mu - 1, mu).astype(np.uint8)


def _level_sums(x, w, idx):
    q = IQ4NL_VALUES[idx]
    wq = w * q
    sumqx, sumq2 = np.zeros(len(x), F32), np.zeros(len(x), F32)
    for j in range(x.shape[1]):  # ggml's order: element by element
        sumqx = sumqx + wq[:, j] * x[:, j]
        sumq2 = sumq2 + wq[:, j] * q[:, j]
    return sumqx, sumq2


def _fit_iq4_nl(x):
    """ggml quantize_iq4_nl without importance weights (ntry 7): weights x**2, a search over 15 scales
    around max/127 refit by least squares, then every value snapped to the nearest level."""
    w = x * x
    mx = _first_absmax(x)[:, 0]
    zero = np.abs(mx) < F32(1e-15)
    mx = np.where(zero, F32(1), mx)
    d = (-mx / IQ4NL_VALUES[0]).astype(F32)
    sumqx, sumq2 = _level_sums(x, w, _nearest_level((F32(1) / d)[:, None] * x))
    with np.errstate(divide="ignore", invalid="ignore"):  # all-zero blocks: d is set to 0 below
        d = (sumqx / sumq2).astype(F32)
    best = d * sumqx
    for itry in range(-7, 8):
        iscale = ((F32(itry) + IQ4NL_VALUES[0]) / mx).astype(F32)
        sumqx, sumq2 = _level_sums(x, w, _nearest_level(iscale[:, None] * x))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(better, sumqx / sumq2, d).astype(F32)
        best = np.where(better, d * sumqx, best)
    d = np.where(zero, F32(0), d)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    L = _nearest_level(inv[:, None] * x)
    d = d[:, None]
    return BlockFit(_f16_round(d), np.zeros_like(d), IQ4NL_VALUES, 32, L,
                    lambda L: np.concatenate([_f16_bytes(d), _pack_nibbles(L)], axis=1))


def _d_iq4_nl(b):
    return _f16_values(b[:, :2]) * IQ4NL_VALUES[_unpack_nibbles(b[:, 2:])]


GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("f32", 0, 1, 4, _d_f32, encode=_q_f32),
    GGMLType("f16", 1, 1, 2, _d_f16, encode=_q_f16),
    GGMLType("bf16", 30, 1, 2, _d_bf16, encode=_q_bf16),
    GGMLType("q8_0", 8, 32, 34, _d_q8_0, _fit_q8_0),
    GGMLType("q4_0", 2, 32, 18, _d_q4_0, _fit_q4_0),
    GGMLType("q4_1", 3, 32, 20, _d_q4_1, _fit_q4_1),
    GGMLType("q5_0", 6, 32, 22, _d_q5_0, _fit_q5_0),
    GGMLType("q5_1", 7, 32, 24, _d_q5_1, _fit_q5_1),
    GGMLType("iq4_nl", 20, 32, 18, _d_iq4_nl, _fit_iq4_nl),
    GGMLType("q2_k", 10, 256, 84, _d_q2_k, _fit_q2_k),
    GGMLType("q3_k", 11, 256, 110, _d_q3_k, _fit_q3_k),
    GGMLType("q4_k", 12, 256, 144, _d_q4_k, _fit_q4_k),
    GGMLType("q5_k", 13, 256, 176, _d_q5_k, _fit_q5_k),
    GGMLType("q6_k", 14, 256, 210, _d_q6_k, _fit_q6_k),
)}


def get_type(name: str) -> GGMLType:
    if name not in GGML_TYPES:
        raise ValueError(f"unknown GGML type {name!r}; known: {', '.join(GGML_TYPES)}")
    return GGML_TYPES[name]


def type_by_id(type_id: int) -> GGMLType | None:
    return next((t for t in GGML_TYPES.values() if t.id == type_id), None)


def quantize_rows(w: np.ndarray, type_name: str) -> np.ndarray:
    """w: [rows, n] (any float dtype) -> [rows, n // block_size * type_size] uint8 blocks."""
    t = get_type(type_name)
    w = np.ascontiguousarray(w, dtype=F32)
    rows, n = w.reshape(-1, w.shape[-1]).shape if w.ndim else (1, 1)
    if n % t.block_size:
        raise ValueError(f"GGML type {type_name!r} needs rows that are a multiple of {t.block_size} values, got {n}")
    blocks = t.quantize(w.reshape(-1, t.block_size))
    return blocks.reshape(rows, n // t.block_size * t.type_size)


def dequantize_rows(data: np.ndarray, type_name: str, n: int) -> np.ndarray:
    """data: [rows, n // block_size * type_size] uint8 -> [rows, n] float32."""
    t = get_type(type_name)
    data = np.ascontiguousarray(data).view(np.uint8)
    if n % t.block_size or data.size % t.type_size or data.size // t.type_size * t.block_size % n:
        raise ValueError(f"GGML type {type_name!r}: {data.size} bytes do not hold rows of {n} values")
    return t.dequantize(data.reshape(-1, t.type_size)).reshape(-1, n)
