"""TensorRT's entropy (KL-divergence) calibration, written out from Migacz, "8-bit Inference with
TensorRT" (GTC 2017), slide "Entropy Calibration - pseudocode", as an oracle for
lowbit.core.observers. Slow on purpose: one candidate at a time.

    Input: histogram H of |x| with 2048 bins
    for i in 128 .. 2047:
        P = H[0 : i];  P[i-1] += sum(H[i:])          (outliers folded into the last kept bin)
        Q = H[0 : i] merged into 128 chunks, each chunk's count spread evenly over its
            non-empty bins (empty bins stay empty), then expanded back to i bins
        divergence[i] = KL(P / sum P || Q / sum Q)
    m = argmin divergence;  threshold = (m + 0.5) * bin width

The slide leaves two points open, fixed here: when 128 does not divide i, bin k belongs to chunk
floor(k * 128 / i) (chunks differ in size by at most one); KL is infinite where Q is zero and P
is not (the last kept bin can be empty while outliers land in it), and the first minimum wins.
"""
from __future__ import annotations

import math

import numpy as np


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    if (q[m] == 0).any():
        return math.inf
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def entropy_threshold(hist: np.ndarray, bin_width: float, quantized_bins: int = 128) -> float:
    """hist: counts of |x| per bin [bins] -> the clipping threshold."""
    bins = len(hist)
    best, best_i = math.inf, bins
    for i in range(quantized_bins, bins):
        if hist[:i].sum() == 0:
            continue
        P = hist[:i].astype(np.float64).copy()
        P[i - 1] += hist[i:].sum()
        chunk = np.arange(i) * quantized_bins // i  # the chunk of each kept bin
        merged = np.bincount(chunk, weights=hist[:i], minlength=quantized_bins)
        nonempty = np.bincount(chunk, weights=(hist[:i] > 0).astype(np.float64), minlength=quantized_bins)
        Q = np.where(hist[:i] > 0, merged[chunk] / np.maximum(nonempty[chunk], 1), 0.0)
        d = kl_divergence(P, Q)
        if d < best:
            best, best_i = d, i
    return min((best_i + 0.5) * bin_width, bins * bin_width)
