"""Quantization error statistics."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .granularity import GroupView
from .grid import grid_bounds
from .qtensor import QTensor


@dataclass(frozen=True)
class ErrorStats:
    mse: float
    max_abs: float
    sqnr_db: float  # 10 log10(sum x^2 / sum (x - q)^2); inf when exact
    # share of values beyond the grid's ends by more than half the end gap: values that
    # saturate instead of rounding (None when q is a plain tensor)
    clipped: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def error_stats(x: torch.Tensor, q: "QTensor | torch.Tensor") -> ErrorStats:
    """Error of q (a QTensor, or a dequantized tensor of x's shape) against x."""
    xhat = q.dequantize() if isinstance(q, QTensor) else q
    if tuple(xhat.shape) != tuple(x.shape):
        raise ValueError(f"error_stats: shapes differ, x {tuple(x.shape)} vs q {tuple(xhat.shape)}")
    x64, e = x.double(), (x.double() - xhat.double())
    n = max(x.numel(), 1)
    mse = float(e.pow(2).sum() / n)
    signal, noise = float(x64.pow(2).sum()), float(e.pow(2).sum())
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    max_abs = float(e.abs().max()) if x.numel() else 0.0
    clipped = _clipped_share(x, q) if isinstance(q, QTensor) else None
    return ErrorStats(mse=mse, max_abs=max_abs, sqnr_db=sqnr, clipped=clipped)


def _clipped_share(x: torch.Tensor, q: QTensor) -> float:
    if q.numel == 0 or q.codebook is not None:
        return 0.0
    view = GroupView(q.shape, q.scheme.granularity)
    s = view.split_stats(q.scale_values())
    z = q.zero_values()
    zs = view.split_stats(z) if z is not None else [None] * len(s)
    v = q.scheme.fmt.values
    gap_lo, gap_hi = float(v[1] - v[0]) / 2, float(v[-1] - v[-2]) / 2
    count = 0
    for part, sp, zp in zip(view.parts(x.float()), s, zs):
        lo, hi = grid_bounds(sp, zp, q.scheme.fmt)
        count += int(((part < lo - gap_lo * sp) | (part > hi + gap_hi * sp)).sum())
    return count / q.numel
