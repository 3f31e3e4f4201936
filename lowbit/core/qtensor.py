"""QTensor: a quantized tensor as plain data (not a torch.Tensor subclass).

    codes        flat uint8, codes of `scheme.bits` bits packed LSB first
    scales       per-group scales in the scale format, natural stats shape
                 (see granularity.py); a QTensor itself when double-quantized
    zeros        affine zero points, same shape and storage as scales
    tensor_scale fp32 scalar over the whole tensor (NVFP4), else None
    codebook     learned k-means values [*stats_shape, 2^bits], else None
    offset       fp32 scalar added after dequantizing (double-quantized scales)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import scales as scale_store
from .granularity import GroupView, PerChannel, PerGroup, PerTensor, PerToken
from .grid import decode_part
from .packing import unpack_bits_le
from .scheme import Scheme


@dataclass
class QTensor:
    codes: torch.Tensor
    shape: tuple[int, ...]
    scheme: Scheme
    scales: "torch.Tensor | QTensor | None" = None
    zeros: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None
    codebook: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        """Where the codes are (code that places modules by their weight's device, such as peft, reads it)."""
        return self.codes.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Exact bytes held: packed codes plus every scale, zero point and codebook."""
        parts = [self.codes, self.zeros, self.tensor_scale, self.codebook, self.offset]
        total = sum(t.numel() * t.element_size() for t in parts if t is not None)
        if isinstance(self.scales, QTensor):
            total += self.scales.nbytes
        elif self.scales is not None:
            total += self.scales.numel() * self.scales.element_size()
        return total

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0

    def unpack_codes(self) -> torch.Tensor:
        """Codes as uint8 in the tensor's shape."""
        return unpack_bits_le(self.codes, self.scheme.bits, self.numel).reshape(self.shape)

    def scale_values(self) -> torch.Tensor:
        """Effective float32 scales in the natural stats shape (tensor scale applied)."""
        if isinstance(self.scales, QTensor):
            # Double-quantized scales can land at or below zero for a group far below its
            # block's absmax; the smallest positive float keeps such a group finite.
            s = self.scales.dequantize().clamp(min=torch.finfo(torch.float32).tiny)
            s = s.reshape(GroupView(self.shape, self.scheme.granularity).stats_shape)
        else:
            s = scale_store.load(self.scales, self.scheme.scale_format)
        if self.tensor_scale is not None:
            s = s * self.tensor_scale
        return s

    def zero_values(self) -> torch.Tensor | None:
        return None if self.zeros is None else scale_store.load(self.zeros, self.scheme.scale_format)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> tensor of `shape` in `dtype`."""
        if self.numel == 0:
            return torch.zeros(self.shape, dtype=dtype)
        view = GroupView(self.shape, self.scheme.granularity)
        codes = view.parts(self.unpack_codes())
        if self.codebook is not None:
            books = _split_books(view, self.codebook.float())
            out = [torch.gather(b, 1, c.long()) for c, b in zip(codes, books)]
        else:
            s_parts = view.split_stats(self.scale_values())
            z = self.zero_values()
            z_parts = view.split_stats(z) if z is not None else [None] * len(codes)
            fmt = self.scheme.fmt
            out = [decode_part(c, s, zz, fmt) for c, s, zz in zip(codes, s_parts, z_parts)]
        x = view.merge(out)
        if self.offset is not None:
            x = x + self.offset
        return x.to(dtype)

    def rows_are_independent(self) -> bool:
        """True when each row of a 2-D tensor has its own codes bytes and statistics (per tensor, per
        row, per token, or groups along the row), so rows() can dequantize a few rows alone."""
        g = self.scheme.granularity
        if len(self.shape) != 2 or (self.shape[1] * self.scheme.bits) % 8:
            return False  # rows must start on a byte of the packed codes
        return (isinstance(g, (PerTensor, PerToken)) or (isinstance(g, PerChannel) and g.axis % 2 == 0)
                or (isinstance(g, PerGroup) and g.axis % 2 == 1))

    def rows(self, index: torch.Tensor) -> "QTensor":
        """The rows `index` [n] (int64) of a 2-D QTensor [rows, cols] as a QTensor [n, cols], codes and
        statistics sliced, nothing dequantized. rows(i).dequantize() equals dequantize()[i] bit for bit.

        Example: table.rows(torch.tensor([5, 7])).dequantize() -> [2, cols]
        """
        if not self.rows_are_independent():
            raise ValueError(f"QTensor.rows needs a 2-D tensor whose rows own their codes and scales (per tensor, "
                             f"per channel along axis 0, per token, or groups along axis -1, with cols x bits a "
                             f"multiple of 8); got shape {self.shape}, {self.scheme.granularity}, {self.scheme.bits} bits")
        n_rows, cols = self.shape
        index = index.reshape(-1)
        codes = self.codes.view(n_rows, cols * self.scheme.bits // 8)[index].reshape(-1)
        per_tensor = isinstance(self.scheme.granularity, PerTensor)

        def take(t):  # statistics: [rows, ...] sliced by row; a per-tensor value is shared
            return t if t is None or per_tensor or t.dim() == 0 else t[index]

        scheme, scales, tensor_scale = self.scheme, self.scales, self.tensor_scale
        if isinstance(scales, QTensor):  # double-quantized scales: their blocks span rows, so take values
            scales = self.scale_values().reshape(GroupView(self.shape, scheme.granularity).stats_shape)
            scheme, tensor_scale = scheme.replace(scale_format="fp32", double_quant=None, tensor_scale=False), None
        return QTensor(codes, (int(index.numel()), cols), scheme, scales=take(scales), zeros=take(self.zeros),
                       tensor_scale=tensor_scale, codebook=take(self.codebook), offset=self.offset)

    @staticmethod
    def cat_rows(parts: "list[QTensor]") -> "QTensor":
        """The inverse of rows(): QTensors [n_i, cols] quantized row by row (one scheme, rows owning
        their codes and statistics, no tensor-wide scale) -> one QTensor [sum n_i, cols].

        Example: QTensor.cat_rows([rtn(w[:4096], s), rtn(w[4096:], s)]) equals rtn(w, s) for a
        per-row or per-group scheme (pipeline/rowwise.py quantizes big tensors this way)."""
        first = parts[0]
        cols, scheme = first.shape[1], first.scheme
        if any(p.scheme != scheme or len(p.shape) != 2 or p.shape[1] != cols for p in parts):
            raise ValueError("QTensor.cat_rows: the parts must be 2-D with one scheme and one column count")
        if (not first.rows_are_independent() or isinstance(scheme.granularity, PerTensor) or first.tensor_scale
                is not None or first.offset is not None or isinstance(first.scales, QTensor)):
            raise ValueError(f"QTensor.cat_rows: {scheme.granularity} with tensor-wide statistics cannot be "
                             "joined from row blocks; quantize the tensor whole")

        def cat(ts):
            return None if ts[0] is None else torch.cat(ts)

        return QTensor(cat([p.codes for p in parts]), (sum(p.shape[0] for p in parts), cols), scheme,
                       scales=cat([p.scales for p in parts]), zeros=cat([p.zeros for p in parts]),
                       codebook=cat([p.codebook for p in parts]))

    def __repr__(self) -> str:
        name = self.scheme.name or self.scheme.format
        return (f"QTensor({name}, shape={self.shape}, {self.bits_per_weight:.3f} bits/weight, "
                f"{self.nbytes} bytes)")


def _split_books(view: GroupView, books: torch.Tensor) -> list[torch.Tensor]:
    """Codebooks [*stats_shape, k] -> per part [G_i, k]."""
    per_k = [view.split_stats(books[..., j].contiguous()) for j in range(books.shape[-1])]
    return [torch.cat([p[i] for p in per_k], dim=1) for i in range(len(per_k[0]))]
