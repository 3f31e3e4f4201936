"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 with mixed-precision decomposition.

A runtime scheme: it changes the forward, not the weights. The weights are plain absmax int8,
one scale per output channel (RTN). At run time, with X: [T, K] the tokens of one call,

    O      = { k : |X[t, k]| >= alpha for some token t }      (outlier feature columns)
    X W^T ~= X[:, O] W[:, O]^T                    (16/32-bit, the dequantized int8 weight columns)
           + int8(X[:, ~O]) int8(W[:, ~O])^T * s_x s_w^T  (int8 per token x int8 per channel)

alpha = 6.0 in the paper. The columns are chosen per call over every token of the batch, and the
per-token scales s_x are taken over the regular columns only (as bitsandbytes does: the outlier
columns are zeroed before the row absmax), so one outlier no longer flattens its whole row.

    cols = outlier_columns(x, 6.0)                  # x: [T, K] -> int64 [n], sorted
    x_regular, x_outlier = decompose(x, cols)       # [T, K] (cols zeroed), [T, n]
"""
from __future__ import annotations

import math

import torch

DEFAULT_THRESHOLD = 6.0


def check_threshold(threshold: float) -> float:
    """The outlier threshold alpha as a float: a number >= 0 (inf: no outliers, plain int8)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) \
            or threshold < 0:
        raise ValueError(f"outlier_threshold={threshold!r}: give a number >= 0 (6.0 in LLM.int8(); "
                         "0 runs every column in full precision, inf none)")
    return float(threshold)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """x: [T, K] -> int64 [n]: the feature columns with |x| >= threshold in any row, sorted.

    Example: outlier_columns(torch.tensor([[0.5, -7.0, 1.0]]), 6.0) -> tensor([1])
    """
    return (x.abs() >= threshold).any(dim=0).nonzero().squeeze(1)


def decompose(x: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K], cols: [n] -> (x with the columns zeroed [T, K], the columns x[:, cols] [T, n])."""
    x_regular = x.clone()
    x_regular[:, cols] = 0
    return x_regular, x[:, cols]
