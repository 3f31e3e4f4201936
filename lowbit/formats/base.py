"""The Format interface: a finite set of values and the rule that rounds to them.

Codes are the format's bit patterns as unsigned integers: uint8 for formats of
8 bits or fewer, int32 above that. `decode(encode(x))` is `round(x)`.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch


def code_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int32


class Format(ABC):
    name: str
    bits: int
    kind: str  # "int", "float" or "codebook"

    @abstractmethod
    def encode(self, x: torch.Tensor, saturate: bool = True) -> torch.Tensor:
        """x: float tensor of any shape -> codes of the same shape."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: integer tensor -> float32 tensor of the same shape."""

    def round(self, x: torch.Tensor, saturate: bool = True) -> torch.Tensor:
        """The nearest representable value of each element, as float32."""
        return self.decode(self.encode(x, saturate=saturate))

    # -- what the format can represent -------------------------------------
    @property
    def values(self) -> torch.Tensor:
        """Sorted distinct finite values (float64), for formats of 16 bits or fewer."""
        if self.bits > 16:
            raise ValueError(f"format {self.name!r} has {self.bits} bits: too many values to list")
        table = self.decode(torch.arange(2**self.bits, dtype=torch.int64).to(code_dtype(self.bits)))
        table = table.double()
        table = table[torch.isfinite(table)]
        table = torch.where(table == 0, torch.zeros_like(table), table)  # -0 and +0 are one value
        return torch.unique(table)

    @property
    def max(self) -> float:
        return float(self.values.max())

    @property
    def min(self) -> float:
        return float(self.values.min())

    @property
    def smallest_subnormal(self) -> float:
        """Smallest positive value (equals smallest_normal for formats without subnormals)."""
        v = self.values
        return float(v[v > 0].min())

    @property
    def smallest_normal(self) -> float:
        return self.smallest_subnormal

    @property
    def eps(self) -> float:
        """Distance from 1.0 to the next larger value; for formats without 1.0 or
        nothing above it, the largest gap between neighbours relative to max."""
        v = self.values
        above = v[v > 1.0]
        if (v == 1.0).any() and len(above):
            return float(above.min() - 1.0)
        return float((v[1:] - v[:-1]).max() / v.abs().max())

    @property
    def dynamic_range(self) -> float:
        """max / smallest positive value, as a ratio."""
        return self.max / self.smallest_subnormal

    @property
    def dynamic_range_db(self) -> float:
        return 20.0 * math.log10(self.dynamic_range)

    @property
    def is_signed(self) -> bool:
        return self.min < 0

    def __repr__(self) -> str:
        return f"<Format {self.name}: {self.kind}, {self.bits} bits>"


def check_float_input(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f"{fmt.name}.encode needs a floating-point tensor, got dtype {x.dtype}")
    return x


def check_codes(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor):
        codes = torch.as_tensor(codes)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"{fmt.name}.decode needs an integer tensor of codes, got dtype {codes.dtype}")
    return codes
