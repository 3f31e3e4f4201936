"""Quantize a big weight a block of rows at a time, so that it is never in memory whole.

Round to nearest (and its MSE clipping search) treats each row alone when the scheme's statistics
are per row or per group along the row: the rows of rtn(w) are rtn of w's rows. So a weight
[out, in] read from disk `rows` at a time and joined with QTensor.cat_rows is the very QTensor that
quantizing it whole gives, bit for bit (tests/test_rowwise.py), at the memory of one block of rows.
io/streaming/ quantizes the embedding table, the output layer and an 8B model's MLP weights so.

Not row-wise, so quantized whole: hqq (it stops when no group of the whole tensor improves; its
recipes group along the output axis), gptq (left to the calibrated path), schemes with a
tensor-wide statistic (per tensor, NVFP4's tensor scale, double-quantized scales, k-means
codebooks) and stochastic rounding (one random stream over the whole tensor).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..core import QTensor, Scheme
from ..core.granularity import PerChannel, PerGroup
from ..methods import METHODS

ROW_WISE = ("rtn", "mse")  # solvers whose result for a row depends on that row only


def by_rows(solver: str, scheme: Scheme, shape: tuple[int, ...]) -> bool:
    """True when `solver` with `scheme` on a weight of `shape` may be run a block of rows at a time."""
    g = scheme.granularity
    per_row = (isinstance(g, PerChannel) and g.axis % 2 == 0) or (isinstance(g, PerGroup) and g.axis % 2 == 1)
    return (solver in ROW_WISE and len(shape) == 2 and per_row and (shape[1] * scheme.bits) % 8 == 0
            and scheme.rounding == "nearest" and not scheme.tensor_scale and scheme.double_quant is None
            and not scheme.is_learned)


def quantize_by_rows(read_rows: Callable[[int, int], torch.Tensor], shape: tuple[int, int], solver: str,
                     scheme: Scheme, options: dict | None = None, *, block_bytes: int = 64 << 20) -> QTensor:
    """read_rows(start, stop) -> w[start:stop] ([stop - start, in], any float dtype); -> the QTensor
    of the whole w [out, in], quantizing about `block_bytes` of float32 rows at a time.

    Example: quantize_by_rows(lambda a, b: w[a:b], w.shape, "rtn", scheme) equals rtn(w, scheme)."""
    if not by_rows(solver, scheme, shape):
        raise ValueError(f"{solver} with {scheme.granularity} ({scheme.format}) on a {tuple(shape)} weight is not "
                         f"row-wise; row-wise solvers: {', '.join(ROW_WISE)} with per-row or per-group scales")
    fn, options = METHODS[solver], options or {}
    rows = max(1, block_bytes // (4 * shape[1]))
    parts = []
    for start in range(0, shape[0], rows):
        w = read_rows(start, min(start + rows, shape[0])).float()
        parts.append(fn(w, scheme, **options))
        del w  # the next block's rows are read before this name would be rebound
    return QTensor.cat_rows(parts)
