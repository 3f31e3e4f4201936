"""AWQ (Lin et al., 2024): activation-aware scaling and clipping for weight-only quantization.

Scale: salient input channels (large mean |x|) get their weights scaled up
before rounding, their inputs scaled down. Per group of layers sharing an
input, a grid over the exponent alpha in [0, 1):

    s = mean|X|^alpha / sqrt(max * min)
    loss(s) = sum over layers ||(W - Q(W s) / s) X||^2 = tr(D H D^T)   (H = 2 X X^T / n)

keeps the s with the least loss (alpha = 0, s = 1, is round-to-nearest, so
AWQ never loses to it on this loss). The pipeline folds 1/s into the
producer of X. Clip: per group of weights, shrink the range by a ratio from a
grid and keep, per row and group, the one whose output error
d H_gg d^T (the group's block of H) is least; the clipped weights then go to
the solver (round to nearest, or GPTQ when composed as "awq+gptq").
"""
from __future__ import annotations

import torch

from ..core import Scheme, quantize
from ..core.granularity import PerChannel, PerGroup, PerTensor
from ..core.hessian import output_error

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 down to 0.5


def awq_scales(weights: list[torch.Tensor], stats, scheme, *, grid: int = 20, coarse: int = 1,
               row_stride: int = 1) -> torch.Tensor:
    """weights: [out_i, in] of the layers sharing the input -> s: [in]. scheme: one Scheme for all,
    or one per weight (a mixed-precision recipe may give q/k/v different schemes: each layer's
    error is then counted on its own grid).

    Cheaper searches for the same grid (the calibrated GGUF path uses both):
    coarse: score every `coarse`-th exponent (a power of two) first, then halve the step around the best
    (coarse=4 on 20 points: 5 + 2 + 2 scored instead of 20; the same choice where the loss is unimodal).
    row_stride: score every `row_stride`-th row of each weight. The loss is a sum over rows and a
    row-local grid (groups along the input axis, GGML blocks) rounds each row alone, so this is the
    exact loss of those rows: an estimate of the whole loss at 1/row_stride of the cost."""
    H, xm = stats.hessian, stats.absmean.clamp(min=1e-6)
    schemes = list(scheme) if isinstance(scheme, (list, tuple)) else [scheme] * len(weights)
    if len(schemes) != len(weights):
        raise ValueError(f"awq_scales: {len(schemes)} schemes for {len(weights)} weights")
    if coarse < 1 or coarse & (coarse - 1):
        raise ValueError(f"awq_scales: coarse={coarse}: give a power of two (1 scores every grid point)")
    if row_stride < 1:
        raise ValueError(f"awq_scales: row_stride={row_stride}: give 1 (every row) or more")
    if row_stride > 1 and any(_row_local(sc) is False for sc in schemes):
        raise ValueError("awq_scales: row_stride needs a grid that rounds each row alone (groups along the "
                         "input axis, per channel or GGML blocks), not a per-tensor scale")
    weights = [w[::row_stride] for w in weights]

    def scaled(i: int) -> torch.Tensor:
        s = xm.pow(i / grid)
        return s / (s.max() * s.min()).sqrt()

    losses: dict[int, float] = {}

    def score(i: int) -> None:
        if 0 <= i < grid and i not in losses:
            s = scaled(i)
            losses[i] = sum(_loss(w, fake_quantize(w * s, sc) / s, H) for w, sc in zip(weights, schemes))

    for i in range(0, grid, coarse):
        score(i)
    step = coarse
    while step > 1:
        step //= 2
        best = min(sorted(losses), key=losses.get)
        score(best - step)
        score(best + step)
    return scaled(min(sorted(losses), key=losses.get))  # the first (smallest exponent) of equal losses


def _row_local(scheme) -> bool | None:
    """Whether the scheme rounds each row of a weight alone (None: not a Scheme, e.g. a GGML type: yes)."""
    g = getattr(scheme, "granularity", None)
    if g is None:
        return None
    return (isinstance(g, PerChannel) and g.axis in (0, -2)) or (isinstance(g, PerGroup) and g.axis in (-1, 1))


awq_scales.needs = ("hessian", "absmean")


def fake_quantize(w: torch.Tensor, scheme) -> torch.Tensor:
    """Round trip through the scheme's grid; a scheme with its own `roundtrip` (a GGML block type,
    pipeline/gguf_calibrated.py) rounds itself."""
    rt = getattr(scheme, "roundtrip", None)
    return rt(w) if rt is not None else quantize(w, scheme).dequantize()


def awq_clip(w: torch.Tensor, scheme: Scheme, stats) -> torch.Tensor:
    """w: [out, in] -> w with each (row, group) range shrunk by the ratio of least output error."""
    H = stats.hessian
    spans = _spans(scheme, w.shape[1])
    lo, hi = [], []
    for c0, c1 in spans:
        a, b = w[:, c0:c1].amin(1), w[:, c0:c1].amax(1)
        if scheme.symmetric:
            b = torch.maximum(-a, b)
            a = -b
        lo.append(a)
        hi.append(b)
    lo, hi = torch.stack(lo, 1), torch.stack(hi, 1)  # [out, groups]
    widths = torch.tensor([c1 - c0 for c0, c1 in spans])
    best_err = torch.full(lo.shape, torch.inf)
    out = w.clone()
    for r in CLIP_RATIOS:
        # one quantize of the whole clipped weight per ratio; the error per (row, group)
        # uses the group's diagonal block of H
        wc = torch.clamp(w, (lo * r).repeat_interleave(widths, 1), (hi * r).repeat_interleave(widths, 1))
        d = w - quantize(wc, scheme).dequantize()
        err = torch.stack([((d[:, c0:c1] @ H[c0:c1, c0:c1]) * d[:, c0:c1]).sum(1) for c0, c1 in spans], 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        out = torch.where(better.repeat_interleave(widths, 1), wc, out)
    return out


def _loss(w, w_hat, H) -> float:
    return float(output_error(w - w_hat, H))


def _spans(scheme: Scheme, cols: int) -> list[tuple[int, int]]:
    """Column ranges that share one scale per row."""
    g = scheme.granularity
    if isinstance(g, PerGroup) and g.axis in (-1, 1):
        return [(c, min(c + g.size, cols)) for c in range(0, cols, g.size)]
    if isinstance(g, (PerChannel, PerTensor)):
        return [(0, cols)]
    raise ValueError(f"awq clipping handles group, channel and tensor granularity, not {g}")
