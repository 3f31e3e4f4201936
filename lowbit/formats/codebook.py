"""Formats defined by a table of values: NF4, bitsandbytes FP4, the 8-bit
dynamic (tree) map of 8-bit Adam, ternary, binary, and learned codebooks.

A code is the index of a value in the sorted table. Rounding goes to the
nearest value; an exact tie goes to the value nearer zero. Inputs beyond the
table's ends take the end value (a codebook always saturates).
"""
from __future__ import annotations

import math

import torch

from .base import Format, check_codes, check_float_input, code_dtype


class CodebookFormat(Format):
    kind = "codebook"

    def __init__(self, name: str, values, bits: int | None = None):
        table = torch.unique(torch.as_tensor(values, dtype=torch.float64))  # sorted, -0 == +0
        if table.numel() < 2 or not torch.isfinite(table).all():
            raise ValueError(f"codebook {name!r}: need at least 2 finite values")
        need = max(1, math.ceil(math.log2(table.numel())))
        if bits is not None and bits < need:
            raise ValueError(f"codebook {name!r}: {table.numel()} values need {need} bits, got {bits}")
        self.name, self.bits = name, bits or need
        self._values = table
        self._table32 = table.float()
        self._mids = ((table[1:] + table[:-1]) / 2).float()

    @property
    def values(self) -> torch.Tensor:
        return self._values

    def encode(self, x: torch.Tensor, saturate: bool = True) -> torch.Tensor:
        x = check_float_input(x, self)
        if torch.isnan(x).any():
            raise ValueError(f"{self.name}.encode: input has NaN, which a codebook cannot hold")
        x = x.float()
        below = torch.bucketize(x, self._mids, right=False)  # ties -> lower value
        above = torch.bucketize(x, self._mids, right=True)   # ties -> higher value
        idx = torch.where(x >= 0, below, above)
        return idx.to(code_dtype(self.bits))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = check_codes(codes, self)
        idx = codes.long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self._values.numel()):
            raise ValueError(f"{self.name}.decode: codes must lie in [0, {self._values.numel() - 1}]")
        return self._table32[idx]


# The NF4 table as published with QLoRA (Dettmers et al. 2023, appendix E) and
# used by bitsandbytes; normal_float_values(4) reproduces it to 1e-7.
NF4_VALUES = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def normal_float_values(bits: int = 4, offset: float = 0.9677083) -> list[float]:
    """NormalFloat of the QLoRA paper: quantiles of N(0, 1), asymmetric so that
    zero is exact, normalised to [-1, 1]. bits=4 gives the 16 NF4 values."""
    from statistics import NormalDist

    ppf = NormalDist().inv_cdf
    n_pos, n_neg = 2 ** (bits - 1) + 1, 2 ** (bits - 1)

    def lin(a, b, n):
        return [a + (b - a) * i / (n - 1) for i in range(n)]

    pos = [ppf(p) for p in lin(offset, 0.5, n_pos)[:-1]]
    neg = [-ppf(p) for p in lin(offset, 0.5, n_neg)[:-1]]
    vals = sorted(pos + [0.0] + neg)
    top = max(abs(v) for v in vals)
    return [v / top for v in vals]


def bnb_fp4_values() -> list[float]:
    """bitsandbytes' 4-bit float: E2M1 with magnitudes {0, 1/16, 2, 3, 4, 6, 8, 12} / 12."""
    mags = [0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
    return sorted({s * m / 12.0 for m in mags for s in (1.0, -1.0)})


def dynamic_tree_values(signed: bool = True, bits: int = 8, max_exp_bits: int = 7) -> list[float]:
    """The dynamic (tree) map of 8-bit optimizers (Dettmers et al. 2022).

    Each code is sign, a run of zero bits for a decimal exponent 10^-k, an
    indicator bit, then a linear fraction. Level i of the tree holds
    2^i (signed) or 2^(i+1) (unsigned) fractions, the midpoints of equal
    steps in [0.1, 1], times 10^(i - max_exp_bits + 1); 0 and 1 close it.
    """
    value_bits = bits - 1  # unsigned maps spend the sign bit on twice the fractions
    vals: list[float] = []
    for i in range(max_exp_bits):
        n = 2 ** (i + value_bits - max_exp_bits) if signed else 2 ** (i + value_bits - max_exp_bits + 1)
        vals += _level(i, n, max_exp_bits, signed)
    extra = 2 ** (value_bits - max_exp_bits) - 1
    if extra > 0:
        vals += _level(max_exp_bits - 1, extra, max_exp_bits, signed)
    vals += [0.0, 1.0]
    if len(set(vals)) != 2**bits:
        raise ValueError(f"dynamic map: bits={bits}, max_exp_bits={max_exp_bits} give {len(set(vals))} values, not {2**bits}")
    return sorted(vals)


def _level(i: int, n: int, max_exp_bits: int, signed: bool) -> list[float]:
    # float32 steps, as bitsandbytes builds its map, so that the table equals its values bit for bit
    # (float64 midpoints differ from them by up to one float32 ulp)
    edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float32)
    mids = (edges[:-1] + edges[1:]) / 2
    out = ((10.0 ** (i - max_exp_bits + 1)) * mids).tolist()
    return out + [-v for v in out] if signed else out
