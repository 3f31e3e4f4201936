"""Observers: collect activation ranges over calibration batches (static PTQ).

Each observer sees batches x: [..., features] through `update(x)` and returns
the clipping range [lo, hi] with `range(symmetric)`. Rules:
  minmax          running min and max
  moving_average  exponential moving average of per-batch min and max
  percentile      histogram of values, clipped at a percentile
  mse             histogram, clip minimising the expected squared error
  entropy         histogram, clip minimising KL(P || Q) as in TensorRT's calibrator
The histogram observers keep a fixed-size histogram of |x| that grows its range by
re-binning, so memory does not grow with data; an affine range clips each side of the
observed [min, max] at the magnitude the rule picks. tests/test_observers.py checks each
rule against an independent computation (numpy, brute force, TensorRT's loop written out).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch

OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "entropy")


def make_observer(kind: str, **kw) -> "Observer":
    classes = {"minmax": MinMaxObserver, "moving_average": MovingAverageObserver,
               "percentile": HistogramObserver, "mse": HistogramObserver, "entropy": HistogramObserver}
    if kind not in classes:
        raise ValueError(f"observer={kind!r}: choose one of {', '.join(OBSERVERS)}")
    if classes[kind] is HistogramObserver:
        return HistogramObserver(rule=kind, **kw)
    return classes[kind](**kw)


class Observer(ABC):
    @abstractmethod
    def update(self, x: torch.Tensor) -> None:
        """See one batch x: [..., features]."""

    @abstractmethod
    def range(self, symmetric: bool, levels: int = 256) -> tuple[float, float]:
        """The clipping range [lo, hi] for a grid of `levels` values."""

    def _empty_error(self):
        return ValueError(f"{type(self).__name__} saw no data: run calibration batches through the model first")


class MinMaxObserver(Observer):
    def __init__(self):
        self.lo, self.hi = math.inf, -math.inf

    def update(self, x):
        lo, hi = torch.aminmax(x.detach().float())
        self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))

    def range(self, symmetric, levels=256):
        if self.lo > self.hi:
            raise self._empty_error()
        if symmetric:
            a = max(abs(self.lo), abs(self.hi))
            return -a, a
        return min(self.lo, 0.0), max(self.hi, 0.0)


class MovingAverageObserver(MinMaxObserver):
    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.seen = False

    def update(self, x):
        lo, hi = (float(v) for v in torch.aminmax(x.detach().float()))
        if not self.seen:
            self.lo, self.hi, self.seen = lo, hi, True
        else:
            m = self.momentum
            self.lo, self.hi = self.lo + m * (lo - self.lo), self.hi + m * (hi - self.hi)


class HistogramObserver(Observer):
    def __init__(self, rule: str = "percentile", bins: int = 2048, percentile: float = 99.99):
        self.rule, self.bins, self.percentile = rule, bins, percentile
        self.hist_abs = torch.zeros(bins, dtype=torch.float64)
        self.max_abs = 0.0
        self.minmax = MinMaxObserver()

    def update(self, x):
        x = x.detach().float().reshape(-1)
        self.minmax.update(x)
        a = x.abs()
        top = float(a.max())
        if top > self.max_abs:
            self._regrid(top)
        if self.max_abs > 0:
            self.hist_abs += torch.histc(a, self.bins, 0, self.max_abs).double()

    def _regrid(self, top: float) -> None:
        """Grow the range to `top`, moving old counts to the new bins by their centres."""
        if self.max_abs > 0 and self.hist_abs.sum() > 0:
            centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.max_abs / self.bins
            idx = torch.clamp((centres / top * self.bins).long(), max=self.bins - 1)
            self.hist_abs = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, idx, self.hist_abs)
        self.max_abs = top

    def range(self, symmetric, levels=256):
        if self.minmax.lo > self.minmax.hi:
            raise self._empty_error()
        t = {"percentile": self._percentile, "mse": self._mse, "entropy": self._entropy}[self.rule](levels)
        if symmetric:
            return -t, t
        # Affine: clip each side of the observed range at the chosen magnitude.
        return max(min(self.minmax.lo, 0.0), -t), min(max(self.minmax.hi, 0.0), t)

    def _edges(self):
        return (torch.arange(1, self.bins + 1, dtype=torch.float64)) * self.max_abs / self.bins

    def _percentile(self, levels):
        # the first bin whose cumulative count reaches the percentile's share of all counts; in counts,
        # not fractions: 19980 / 20000 rounds below 0.999 and would skip to the next non-empty bin
        counts = torch.cumsum(self.hist_abs, 0)
        need = float(self.hist_abs.sum()) * self.percentile / 100.0
        i = int(torch.searchsorted(counts, torch.tensor(need * (1 - 1e-12), dtype=torch.float64)))
        return float(self._edges()[min(i, self.bins - 1)])

    def _mse(self, levels):
        """Expected squared error of a symmetric uniform grid clipped at t, from the histogram."""
        centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.max_abs / self.bins
        best_t, best = self.max_abs, math.inf
        for k in range(self.bins // 16, self.bins + 1, max(1, self.bins // 256)):
            t = k * self.max_abs / self.bins
            step = t / (levels // 2 - 1 if levels > 2 else 1)
            inside = centres <= t
            err = torch.where(inside, torch.full_like(centres, step**2 / 12), (centres - t) ** 2)
            e = float((err * self.hist_abs).sum())
            if e < best:
                best, best_t = e, t
        return best_t

    def _entropy(self, levels):
        """TensorRT's entropy calibration (Migacz, "8-bit Inference with TensorRT", 2017): for each
        i = nq .. bins-1 (nq = levels/2 quantized bins, 128 for int8), P is the first i bins with the
        outliers (bins i..) folded into bin i-1; Q merges the same i bins (without the outliers) into
        nq chunks (chunk of bin k: floor(k nq / i)) and spreads each chunk's count evenly over its
        non-empty bins; keep the first i of least KL(P || Q) (infinite where Q = 0 < P) and clip at
        (i + 0.5) bin widths. tests/reference/entropy_ref.py spells the loop out.

        Here all candidates at once from prefix sums: within chunk j, Q is one value q_j on the
        non-empty bins, so sum_k P_k log(P_k / q_j) = (sum h log h - m_j log T - m_j log q_j) / T
        (m_j: the chunk's count, T: all counts); only the last kept bin, which holds the outliers,
        is corrected term by term. Work: [candidates, nq], not [candidates, bins]."""
        h = self.hist_abs.numpy()
        n, nq = self.bins, max(levels // 2, 2)
        if n <= nq:
            return self.max_abs
        T = h.sum()
        hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
        C, N, L = (np.concatenate([[0.0], np.cumsum(v)]) for v in (h, (h > 0).astype(np.float64), hlogh))
        i = np.arange(nq, n)[:, None]  # candidate bin counts [I, 1]
        starts = (np.arange(nq + 1)[None, :] * i + nq - 1) // nq  # chunk j: bins starts[j] .. starts[j+1]-1
        mass, count, hl = (np.diff(A[starts], axis=1) for A in (C, N, L))  # [I, nq]
        S = C[i[:, 0]]  # counts inside, before the outliers are folded in
        with np.errstate(divide="ignore", invalid="ignore"):
            q = mass / (np.maximum(count, 1) * S[:, None])  # Q on each chunk's non-empty bins
            chunks = np.where(count > 0, hl - mass * np.log(T) - mass * np.log(q), 0.0).sum(1) / T
            last, tail, q_last = h[i[:, 0] - 1], T - S, q[:, -1]
            p_last = (last + tail) / T
            fix = np.where(last > 0, p_last * np.log(p_last / q_last) - last / T * np.log(last / T / q_last), 0.0)
            kl = np.where((last == 0) & (tail > 0) | (S == 0), np.inf, chunks + fix)
        if not np.isfinite(kl).any():
            return self.max_abs  # no candidate keeps the outliers representable: no clip
        best_i = int(i[int(np.argmin(kl)), 0])  # argmin: the first of equal minima
        return (best_i + 0.5) * self.max_abs / self.bins
