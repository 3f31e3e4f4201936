"""IEEE-like binary floats of any (exponent, mantissa, bias) layout, and E8M0.

Three special-value conventions cover the formats in use:
  "ieee": exponent all ones is Inf (mantissa 0) or NaN (fp16, bf16, fp8_e5m2);
  "fn":   no Inf; only exponent and mantissa all ones is NaN (fp8_e4m3fn);
  "none": every pattern is finite (fp6_e3m2, fp6_e2m3, fp4_e2m1).
Rounding is to nearest, ties to even, with subnormals. Out of range with
saturate=False: "ieee" gives Inf, "fn" gives NaN, "none" clamps (ml_dtypes does
the same); with saturate=True every finite or infinite input clamps to +-max.
"""
from __future__ import annotations

from functools import cached_property

import torch

from .base import Format, check_codes, check_float_input, code_dtype

SPECIALS = ("ieee", "fn", "none")


class FloatFormat(Format):
    kind = "float"

    def __init__(self, name: str, exp_bits: int, man_bits: int, bias: int | None = None,
                 special: str = "ieee"):
        if exp_bits < 1 or man_bits < 0 or 1 + exp_bits + man_bits > 16:
            raise ValueError(f"float layout e{exp_bits}m{man_bits}: need exp_bits >= 1, man_bits >= 0 "
                             "and at most 16 bits with the sign")
        if special not in SPECIALS:
            raise ValueError(f"special={special!r}: choose one of {SPECIALS}")
        self.name = name
        self.exp_bits, self.man_bits = exp_bits, man_bits
        self.bias = 2 ** (exp_bits - 1) - 1 if bias is None else bias
        self.special = special
        self.bits = 1 + exp_bits + man_bits
        self.emin = 1 - self.bias  # exponent of the smallest normal
        # Float32 arithmetic is exact for the small formats (powers of two stay normal);
        # wide-range layouts need float64 so subnormal quanta do not underflow.
        self._compute = torch.float32 if exp_bits <= 5 and man_bits <= 10 else torch.float64

    # -- layout facts --------------------------------------------------------
    @cached_property
    def max(self) -> float:
        top_exp = 2**self.exp_bits - 1 - (self.special == "ieee")
        top_man = 2**self.man_bits - 1 - (self.special == "fn")
        if top_man < 0:  # "fn" with no mantissa bits: the top exponent is all NaN
            top_exp, top_man = top_exp - 1, 2**self.man_bits - 1
        return (1 + top_man / 2**self.man_bits) * 2.0 ** (top_exp - self.bias)

    @property
    def min(self) -> float:
        return -self.max

    @property
    def smallest_normal(self) -> float:
        return 2.0**self.emin

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)

    @property
    def eps(self) -> float:
        return 2.0**-self.man_bits

    @cached_property
    def _table(self) -> torch.Tensor:
        """float32 value of every code, built from the layout in float64."""
        codes = torch.arange(2**self.bits, dtype=torch.int64)
        sign = (codes >> (self.bits - 1)) & 1
        exp = (codes >> self.man_bits) & (2**self.exp_bits - 1)
        man = (codes & (2**self.man_bits - 1)).double()
        normal = (1 + man / 2**self.man_bits) * torch.pow(2.0, (exp - self.bias).double())
        sub = man / 2**self.man_bits * 2.0**self.emin
        mag = torch.where(exp == 0, sub, normal)
        top = exp == 2**self.exp_bits - 1
        if self.special == "ieee":
            mag = torch.where(top & (man == 0), torch.inf, mag)
            mag = torch.where(top & (man != 0), torch.nan, mag)
        elif self.special == "fn":
            mag = torch.where(top & (man == 2**self.man_bits - 1), torch.nan, mag)
        return torch.where(sign == 1, -mag, mag).float()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = check_codes(codes, self)
        return self._table[codes.long() & (2**self.bits - 1)]

    def _nan_code(self) -> int:
        if self.special == "ieee":
            return ((2**self.exp_bits - 1) << self.man_bits) | (1 << max(self.man_bits - 1, 0))
        return 2 ** (self.bits - 1) - 1  # "fn": all ones

    def encode(self, x: torch.Tensor, saturate: bool = True) -> torch.Tensor:
        x = check_float_input(x, self)
        work = x.to(torch.float64 if x.dtype == torch.float64 else self._compute)
        neg = torch.signbit(work)
        a = work.abs()
        # Round the magnitude on the grid of its binade: quantum 2^(e - m), ties to even.
        e = torch.frexp(a)[1] - 1
        e = torch.clamp(e, min=self.emin)
        quantum = torch.ldexp(torch.ones_like(a), (e - self.man_bits).to(a.dtype))
        r = torch.round(a / quantum) * quantum
        big = r > self.max
        r = torch.where(big, torch.full_like(r, self.max), r)
        # Exact bit fields of the rounded magnitude.
        re = torch.clamp(torch.frexp(r)[1] - 1, min=self.emin)
        sub = r < self.smallest_normal
        exp_field = torch.where(sub, 0, re + self.bias).long()
        man_scaled = torch.where(sub, r / self.smallest_subnormal,
                                 (r / torch.ldexp(torch.ones_like(r), re.to(r.dtype)) - 1) * 2**self.man_bits)
        code = (exp_field << self.man_bits) | man_scaled.long()
        code = self._specials(code, work, big, saturate)
        code = code | (neg.long() << (self.bits - 1))
        return self._nan_sign(code, work, neg).to(code_dtype(self.bits))

    def _specials(self, code, work, big, saturate):
        inf_in = torch.isinf(work)
        if self.special == "none" or saturate:
            return code  # already clamped to max (Inf included: |Inf| > max)
        if self.special == "ieee":
            inf_code = (2**self.exp_bits - 1) << self.man_bits
            return torch.where(big | inf_in, inf_code, code)
        return torch.where(big | inf_in, self._nan_code(), code)

    def _nan_sign(self, code, work, neg):
        nan_in = torch.isnan(work)
        if self.special == "none":
            # ml_dtypes turns NaN into a zero whose sign bit is the inverse of the NaN's.
            nan_code = torch.where(neg, 0, 1 << (self.bits - 1))
        else:
            nan_code = self._nan_code() | (neg.long() << (self.bits - 1))
        return torch.where(nan_in, nan_code, code)


class E8M0Format(Format):
    """The MX scale format: 2^(code - 127) for codes 0..254, code 255 is NaN.

    encode rounds to the nearest power of two by value, |x - 2^e| smallest over 2^-127..2^127,
    for every positive input (float32 subnormals included: 7.33e-39 -> 2^-127); a tie
    (x = 1.5 * 2^k, the arithmetic midpoint) rounds up to 2^(k+1), as ml_dtypes does (0.5 and
    0.7): with no mantissa bit there is no even neighbour, and rounding up keeps x within the
    encoded scale. Inputs below 2^-127 become 2^-127 (there is no zero). Inputs from
    1.5 * 2^127 up would round to 2^128: they overflow to NaN (saturate=False) or 2^127.
    No sign and no zero: zero and negative inputs are NaN (saturate=False) or the smallest
    value (saturate=True). NaN is NaN either way.
    """

    kind = "float"
    bits = 8
    exp_bits, man_bits, bias = 8, 0, 127

    def __init__(self, name: str = "e8m0"):
        self.name = name

    max = 2.0**127
    min = 2.0**-127
    smallest_normal = 2.0**-127
    smallest_subnormal = 2.0**-127
    eps = 1.0

    @property
    def is_signed(self) -> bool:
        return False

    @cached_property
    def _table(self) -> torch.Tensor:
        t = torch.pow(2.0, torch.arange(256, dtype=torch.float64) - 127).float()
        t[255] = torch.nan
        return t

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = check_codes(codes, self)
        return self._table[codes.long() & 255]

    def encode(self, x: torch.Tensor, saturate: bool = True) -> torch.Tensor:
        x = check_float_input(x, self)
        a = x.double()
        mant, ex = torch.frexp(a)  # a = mant * 2^ex, mant in [0.5, 1)
        # 0.75 * 2^ex is the midpoint of 2^(ex-1) and 2^ex; float32 subnormals are normal in float64.
        e = ex - 1 + (mant >= 0.75).long()  # ties (1.5 * 2^k) round up
        e = torch.clamp(e, min=-127)  # below 2^-127 the nearest value is 2^-127
        code = torch.clamp(e + 127, 0, 255)
        bad = torch.isnan(a) | (a <= 0) | torch.isinf(a) | (e > 127)
        if saturate:
            code = torch.where((e > 127) | torch.isposinf(a), 254, code)
            code = torch.where((a <= 0) & ~torch.isnan(a) | torch.isneginf(a), 0, code)
            code = torch.where(torch.isnan(a), 255, code)  # saturation clamps values; NaN stays NaN
        else:
            code = torch.where(bad, 255, code)
        return code.to(torch.uint8)
