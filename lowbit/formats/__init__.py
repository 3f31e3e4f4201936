"""Number formats: what each code stands for, in one explicit table.

    >>> from lowbit import formats
    >>> formats.get("fp8_e4m3").round(torch.tensor([1.06]))
    tensor([1.])
"""
from __future__ import annotations

import re

from .base import Format, code_dtype
from .codebook import NF4_VALUES, CodebookFormat, bnb_fp4_values, dynamic_tree_values
from .floating import E8M0Format, FloatFormat
from .integer import IntFormat, fixed_point
from .kmeans import assign as kmeans_assign
from .kmeans import fit_centroids, kmeans

__all__ = ["Format", "FloatFormat", "E8M0Format", "IntFormat", "CodebookFormat", "get", "names",
           "float_format", "fixed_point", "kmeans", "fit_centroids", "kmeans_assign", "code_dtype",
           "KMEANS_NAME"]


def float_format(exp_bits: int, man_bits: int, bias: int | None = None, special: str = "ieee") -> FloatFormat:
    """Any IEEE-like layout, for study: float_format(3, 4) is a 1-3-4 float with bias 3."""
    b = 2 ** (exp_bits - 1) - 1 if bias is None else bias
    return FloatFormat(f"float_e{exp_bits}m{man_bits}_b{b}_{special}", exp_bits, man_bits, b, special)


def _table() -> dict[str, Format]:
    t: dict[str, Format] = {}
    for b in range(2, 9):
        t[f"int{b}"] = IntFormat(f"int{b}", b, signed=True)
    for b in range(1, 9):
        t[f"uint{b}"] = IntFormat(f"uint{b}", b, signed=False)
    t["fp8_e4m3"] = FloatFormat("fp8_e4m3", 4, 3, 7, special="fn")
    t["fp8_e5m2"] = FloatFormat("fp8_e5m2", 5, 2, 15, special="ieee")
    t["fp6_e3m2"] = FloatFormat("fp6_e3m2", 3, 2, 3, special="none")
    t["fp6_e2m3"] = FloatFormat("fp6_e2m3", 2, 3, 1, special="none")
    t["fp4_e2m1"] = FloatFormat("fp4_e2m1", 2, 1, 1, special="none")
    t["e8m0"] = E8M0Format("e8m0")
    t["fp16"] = FloatFormat("fp16", 5, 10, 15, special="ieee")
    t["bf16"] = FloatFormat("bf16", 8, 7, 127, special="ieee")
    t["nf4"] = CodebookFormat("nf4", NF4_VALUES, bits=4)
    t["fp4_bnb"] = CodebookFormat("fp4_bnb", bnb_fp4_values(), bits=4)
    t["dynamic8"] = CodebookFormat("dynamic8", dynamic_tree_values(signed=True), bits=8)
    t["dynamic8_unsigned"] = CodebookFormat("dynamic8_unsigned", dynamic_tree_values(signed=False), bits=8)
    t["ternary"] = CodebookFormat("ternary", [-1.0, 0.0, 1.0], bits=2)
    t["binary"] = CodebookFormat("binary", [-1.0, 1.0], bits=1)
    return t


FORMATS: dict[str, Format] = _table()
_FIXED = re.compile(r"q(\d+)\.(\d+)")
# Learned codebooks are fitted per tensor or group by quantize_tensor, so they are not in the table.
KMEANS_NAME = re.compile(r"kmeans([1-8])")


def names() -> list[str]:
    """Names of the built-in formats (fixed point `qM.N` is accepted for any M, N too)."""
    return list(FORMATS)


def get(name: str | Format) -> Format:
    if isinstance(name, Format):
        return name
    if not isinstance(name, str):
        raise ValueError(f"format must be a name or a Format, got {type(name).__name__}")
    if name in FORMATS:
        return FORMATS[name]
    m = _FIXED.fullmatch(name)
    if m:
        return fixed_point(int(m.group(1)), int(m.group(2)))
    if KMEANS_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is a learned codebook: fit it with lowbit.formats.kmeans(x, bits) or "
                         f"quantize_tensor(x, {name!r}, ...)")
    raise ValueError(f"unknown format {name!r}; known: {', '.join(FORMATS)}, or fixed point 'qM.N' (e.g. 'q3.4')")
