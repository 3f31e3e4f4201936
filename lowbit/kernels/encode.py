"""Fast round-to-nearest encoders for one chunk of scaled values y (float32).

`encode_nearest(y, fmt)` returns the codes that the reference gives, bit for
bit, or None where no fast path applies:

    integer (step 1, <= 8 bits)  fmt.encode_integers(clamp(round(y), qmin, qmax))
    fp8_e4m3 (fn)                fmt.encode(y, saturate=True), via torch's float8 cast
    small tables (<= 16 values)  fmt.encode(y, saturate=True) for codebooks and
                                 4-bit floats, as a sum of comparisons

The comparison sums cost one pass per boundary, so callers feed chunks that
stay in cache (core/grid.py does). y may be overwritten.
"""
from __future__ import annotations

import torch

from ..formats import CodebookFormat, Format, FloatFormat, IntFormat

_F8 = getattr(torch, "float8_e4m3fn", None)


def encode_nearest(y: torch.Tensor, fmt: Format) -> torch.Tensor | None:
    """y: float32 [...] (overwritten) -> uint8 codes [...], or None."""
    if y.dtype != torch.float32 or fmt.bits > 8:
        return None
    if torch.isnan(y.amax()):
        return None  # NaN (max propagates it): codes differ per format; the reference handles them
    if isinstance(fmt, IntFormat):
        return _int_codes(y, fmt) if fmt.step == 1.0 else None
    if isinstance(fmt, FloatFormat) and fmt.name == "fp8_e4m3" and _F8 is not None:
        return _fp8_e4m3_codes(y, fmt)
    bounds = _table_bounds(fmt)
    if bounds is None:
        return None
    signed_float, b = bounds
    if signed_float:  # sign bit + magnitude index
        codes = _count_above(y.abs(), b)
        codes |= torch.signbit(y).to(torch.uint8) << (fmt.bits - 1)
        return codes
    return _count_above(y, b)


def _int_codes(y: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    # clamp then round equals round then clamp: the bounds are integers and round is monotone.
    q = y.clamp_(fmt.qmin, fmt.qmax).round_()
    if not fmt.signed:
        return q.to(torch.uint8)
    codes = q.to(torch.int8).view(torch.uint8)  # two's complement, exact for integers in range
    return codes & (2**fmt.bits - 1) if fmt.bits < 8 else codes


def _fp8_e4m3_codes(y: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    # torch's cast rounds to nearest even with subnormals; NaN was ruled out above and
    # clamping to +-448 makes it saturate (the cast alone would give NaN above 464).
    return y.clamp_(-fmt.max, fmt.max).to(_F8).view(torch.uint8)


def _count_above(y: torch.Tensor, bounds: list[float]) -> torch.Tensor:
    codes = torch.zeros(y.shape, dtype=torch.uint8)
    for b in bounds:
        codes += y > b
    return codes


_BOUNDS: dict[str, tuple[bool, list[float]] | None] = {}


def _table_bounds(fmt: Format) -> tuple[bool, list[float]] | None:
    """Thresholds t_i with code = #(y > t_i), exact for float32 y, or None."""
    if fmt.name not in _BOUNDS:
        _BOUNDS[fmt.name] = _make_bounds(fmt)
    return _BOUNDS[fmt.name]


def _below(v: torch.Tensor) -> torch.Tensor:
    """Largest float32 below v: y > _below(v) is y >= v."""
    return torch.nextafter(v, torch.full_like(v, -torch.inf))


def _make_bounds(fmt: Format) -> tuple[bool, list[float]] | None:
    if isinstance(fmt, CodebookFormat) and fmt.values.numel() <= 16:
        # Reference: nearest value, ties toward zero: y >= 0 counts mids < y, y < 0 counts
        # mids <= y. For a mid m < 0 both are y >= m; for m >= 0 both are y > m.
        mids = fmt._mids
        return False, torch.where(mids < 0, _below(mids), mids).tolist()
    if isinstance(fmt, FloatFormat) and fmt.special == "none" and fmt.bits <= 4:
        # Magnitude codes 0..2^(bits-1)-1 are increasing values; a tie between k and k+1
        # goes to the even code (round half to even), so it counts as above when k+1 is even.
        mags = fmt.decode(torch.arange(2 ** (fmt.bits - 1), dtype=torch.uint8))
        if not bool((mags[1:] > mags[:-1]).all()):
            return None
        mids = (mags[1:] + mags[:-1]) / 2  # exact: halfway between neighbours of a tiny float
        if not torch.equal(mids.double(), (mags[1:].double() + mags[:-1].double()) / 2):
            return None
        up = torch.arange(1, mags.numel()) % 2 == 0
        return True, torch.where(up, _below(mids), mids).tolist()
    return None
