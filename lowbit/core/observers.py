"""Observers: collect activation ranges over calibration batches (static PTQ).

Each observer sees batches x: [..., features] through `update(x)` and returns
the clipping range [lo, hi] with `range(symmetric)`. Rules:
  minmax          running min and max
  moving_average  exponential moving average of per-batch min and max
  percentile      histogram of values, clipped at a percentile
  mse             histogram, clip minimising the expected squared error
  entropy         histogram, clip minimising KL(P || Q) as in TensorRT's calibrator
The histogram observers keep a fixed-size histogram of |x| (symmetric) or x
(affine) that grows its range by re-binning, so memory does not grow with data.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

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
        cdf = torch.cumsum(self.hist_abs, 0) / self.hist_abs.sum()
        i = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100.0, dtype=torch.float64)))
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
        """TensorRT entropy calibration: clip at the bin count i that minimises KL(P || Q), where P is
        the histogram up to i with the outliers folded into the last bin and Q is P merged into
        levels/2 quantization bins and expanded back over the non-empty bins."""
        h = self.hist_abs
        nq = max(levels // 2, 2)
        best_i, best = self.bins, math.inf
        for i in range(nq, self.bins + 1, max(1, self.bins // 256)):
            p = h[:i].clone()
            p[-1] += h[i:].sum()
            nonzero = p > 0
            chunks = torch.tensor_split(torch.arange(i), nq)
            q = torch.zeros(i, dtype=torch.float64)
            for c in chunks:
                mass = h[c].sum()
                nz = nonzero[c]
                if nz.any():
                    q[c[nz]] = mass / nz.sum()
            if p.sum() == 0:
                continue
            pn, qn = p / p.sum(), q / max(float(q.sum()), 1e-300)
            m = nonzero & (qn > 0)
            kl = float((pn[m] * torch.log(pn[m] / qn[m])).sum()) + float(pn[nonzero & (qn == 0)].sum()) * 1e3
            if kl < best:
                best, best_i = kl, i
        return (best_i + 0.5) * self.max_abs / self.bins
