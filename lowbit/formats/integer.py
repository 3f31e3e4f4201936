"""Two's-complement and unsigned integers, and signed fixed point Qm.n.

A fixed-point Qm.n number is an integer of 1 + m + n bits times 2^-n, so one
class covers both: `step` is 1 for plain integers and 2^-n for Qm.n.
Codes are bit patterns: int4 -1 is code 15.
"""
from __future__ import annotations

import torch

from .base import Format, check_codes, check_float_input, code_dtype


class IntFormat(Format):
    kind = "int"

    def __init__(self, name: str, bits: int, signed: bool, step: float = 1.0):
        if not 1 <= bits <= 16 or (signed and bits < 2):
            raise ValueError(f"integer format {name!r}: need 1..16 bits (2..16 when signed), got {bits}")
        self.name, self.bits, self.signed, self.step = name, bits, signed, step
        self.qmin = -(2 ** (bits - 1)) if signed else 0
        self.qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def max(self) -> float:
        return self.qmax * self.step

    @property
    def min(self) -> float:
        return self.qmin * self.step

    @property
    def smallest_normal(self) -> float:
        return self.step

    @property
    def smallest_subnormal(self) -> float:
        return self.step

    @property
    def eps(self) -> float:
        return self.step

    @property
    def is_signed(self) -> bool:
        return self.signed

    def encode_integers(self, q: torch.Tensor) -> torch.Tensor:
        """Integer-valued tensor already inside [qmin, qmax] -> codes."""
        return (q.to(torch.int32) & (2**self.bits - 1)).to(code_dtype(self.bits))

    def encode(self, x: torch.Tensor, saturate: bool = True) -> torch.Tensor:
        x = check_float_input(x, self)
        if torch.isnan(x).any():
            raise ValueError(f"{self.name}.encode: input has NaN, which an integer format cannot hold")
        q = torch.round(x / self.step) if self.step != 1.0 else torch.round(x)
        if not saturate:
            bad = (q < self.qmin) | (q > self.qmax)
            if bad.any():
                raise ValueError(f"{self.name}.encode: {int(bad.sum())} values outside [{self.min}, {self.max}] "
                                 "and saturate=False; pass saturate=True to clamp them")
        q = torch.clamp(q, self.qmin, self.qmax)
        return self.encode_integers(q)

    def decode_integers(self, codes: torch.Tensor) -> torch.Tensor:
        """codes -> the integers they stand for (int32)."""
        q = codes.to(torch.int32) & (2**self.bits - 1)
        if self.signed:
            q = torch.where(q > self.qmax, q - 2**self.bits, q)
        return q

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = check_codes(codes, self)
        q = self.decode_integers(codes).float()
        return q * self.step if self.step != 1.0 else q

    @property
    def values(self) -> torch.Tensor:
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float64) * self.step


def fixed_point(m: int, n: int) -> IntFormat:
    """Signed Qm.n: 1 sign bit, m integer bits, n fraction bits; step 2^-n."""
    if m < 0 or n < 0 or not 2 <= 1 + m + n <= 16:
        raise ValueError(f"fixed point q{m}.{n}: need m, n >= 0 and 2 <= 1 + m + n <= 16 bits")
    return IntFormat(f"q{m}.{n}", 1 + m + n, signed=True, step=2.0**-n)
