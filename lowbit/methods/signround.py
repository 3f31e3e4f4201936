"""SignRound / AutoRound (Cheng et al., 2023, "Optimize Weight Rounding via Signed Gradient Descent"):
learn how each weight rounds, and each group's clipping range, from a transformer block's output error.

For a weight W with per-group scale s and zero point z (affine) the quantized weight is

    W~ = s * (clamp(round(W / s + z + V), qmin, qmax) - z)
    s, z from the group's range [beta * min, alpha * max]          (min < 0 < max; else that end stays)

with V in [-0.5, 0.5] per weight (0: round to nearest) and alpha, beta in [0.5, 1] per group (1: the
full min-max range). All layers of a block are trained together on the block's output error

    L = || block(X_q; W~) - block_fp(X_fp) ||^2 / numel

(X_q: the inputs the already quantized blocks produce; block_fp(X_fp): the float model's output)
by signed gradient descent, round() passing gradients straight through:

    for t in 0..T-1:   p <- clip(p - lr * (1 - t / T) * sign(dL/dp), bounds)     lr = 1 / T

keeping the iterate of least loss (the loss is measured before each step). `signed_descent` is that
loop; `SchemeRounding` puts V, alpha, beta on any lowbit Scheme's grid (integers, fp4/fp8, NF4, with
fp16/e8m0 scales, integer or float zero points: the scales are what core.fit_params gives for the
clipped range, so the QTensor stores them as round to nearest would); `GGMLRounding` puts V on the
codes of a GGML block type's grid (BlockFit: the type's own scales are kept) and packs standard blocks.
The block forward, the minibatches and the float targets come from pipeline/learned_rounding.py.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from ..core import QTensor, Scheme, fit_params
from ..core.ggml_blocks import get_type
from ..core.granularity import GroupView
from ..core.packing import pack_bits_le
from ..formats import IntFormat

V_BOUND = 0.5  # |V| <= 0.5: a weight moves at most to the next grid point
CLIP_BOUNDS = (0.5, 1.0)  # alpha, beta: the range shrinks to at most half


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def signed_descent(rounding: list[torch.Tensor], clipping: list[torch.Tensor], loss_of: Callable[[int], torch.Tensor],
                   *, steps: int, lr: float | None = None, clip_lr: float | None = None,
                   on_step: Callable[[int, float], None] | None = None) -> tuple[float, float]:
    """Minimise loss_of(step) over the leaf tensors `rounding` (kept in [-0.5, 0.5]) and `clipping`
    (kept in [0.5, 1]) by signed gradient descent with a learning rate decaying linearly to 0;
    the parameters end at the iterate of least loss. -> (first loss, best loss).

    lr, clip_lr: 1 / steps by default (AutoRound's). Example:
        signed_descent([V], [alpha], lambda t: ((w_hat(V, alpha) - w) ** 2).sum(), steps=200)"""
    if steps < 0:
        raise ValueError(f"signround steps={steps}: give 0 or more")
    lr = 1.0 / max(steps, 1) if lr is None else lr
    clip_lr = lr if clip_lr is None else clip_lr
    params = list(rounding) + list(clipping)
    best, first, kept = math.inf, None, None
    for t in range(steps):
        loss = loss_of(t)
        value = float(loss.detach())
        first = value if first is None else first
        if value < best:  # the loss of the parameters as they are now, before this step
            best, kept = value, [p.detach().clone() for p in params]
        if on_step is not None:
            on_step(t, value)
        for p in params:
            p.grad = None
        loss.backward()
        decay = 1.0 - t / steps  # torch's LinearLR(start_factor=1, end_factor=0, total_iters=steps)
        with torch.no_grad():
            for group, rate, (lo, hi) in ((rounding, lr, (-V_BOUND, V_BOUND)), (clipping, clip_lr, CLIP_BOUNDS)):
                for p in group:
                    if p.grad is not None:
                        p.sub_(rate * decay * torch.sign(p.grad)).clamp_(lo, hi)
    with torch.no_grad():
        for p, k in zip(params, kept or []):
            p.copy_(k)
    for p in params:
        p.grad = None
    return (math.nan if first is None else first), best


class SchemeRounding:
    """Learned rounding of one weight w [out, in] on a Scheme's grid.

    V: per part of the Scheme's GroupView, [G, L] like the part; alpha, beta: [G, 1].
        r = SchemeRounding(w, Scheme("uint4", PerGroup(64), symmetric=False, range="minmax"))
        w_hat = r.weight()      # differentiable in r.V, r.alpha, r.beta
        q = r.qtensor()         # the same values as a QTensor: q.dequantize() == r.weight()"""

    def __init__(self, w: torch.Tensor, scheme: Scheme, *, clip: bool = True):
        if scheme.is_learned:
            raise ValueError(f"signround: {scheme.format!r} learns a codebook per group; choose a format with a "
                             "fixed grid (int, fp, nf4)")
        if scheme.rounding != "nearest":
            raise ValueError(f"signround learns the rounding itself; the scheme's rounding={scheme.rounding!r} "
                             "must be 'nearest'")
        self.w, self.scheme = w.detach().float(), scheme
        self.view = GroupView(tuple(w.shape), scheme.granularity)
        # the range rule is replaced by the learned clipping of the full range
        self.fit_scheme = scheme.replace(range="absmax" if scheme.symmetric else "minmax", name=None)
        self.parts = self.view.parts(self.w)
        self.lo = [p.amin(1, keepdim=True) for p in self.parts]
        self.hi = [p.amax(1, keepdim=True) for p in self.parts]
        self.V = [torch.zeros_like(p, requires_grad=True) for p in self.parts]
        self.alpha = [torch.ones_like(h, requires_grad=clip) for h in self.hi]
        self.beta = [torch.ones_like(h, requires_grad=clip) for h in self.hi]
        self.clip = clip

    @property
    def rounding(self) -> list[torch.Tensor]:
        return self.V

    @property
    def clipping(self) -> list[torch.Tensor]:
        return self.alpha + self.beta if self.clip else []

    def _ranges(self):
        """Per part: the clipped range [lo', hi'] (differentiable in alpha, beta)."""
        for lo, hi, a, b in zip(self.lo, self.hi, self.alpha, self.beta):
            yield torch.where(lo < 0, lo * b, lo), torch.where(hi > 0, hi * a, hi)

    def _grid(self):
        """Per part: (s, z or None) as the QTensor will store them (forward) with the gradient of the exact
        formula (backward), and the fitted QTensor without codes."""
        ranges = list(self._ranges())
        clipped = self.view.merge([torch.minimum(torch.maximum(p, lo.detach()), hi.detach())
                                   for p, (lo, hi) in zip(self.parts, ranges)])
        params = fit_params(clipped, self.fit_scheme)
        s_cols = self.view.split_stats(params.scale_values())
        z_cols = self.view.split_stats(params.zero_values()) if params.zeros is not None else [None] * len(ranges)
        fmt, out = self.scheme.fmt, []
        for (lo, hi), s_st, z_st in zip(ranges, s_cols, z_cols):
            s_st = s_st.reshape(-1, 1)
            if self.scheme.symmetric:
                s = torch.maximum(-lo, hi) / fmt.max
                out.append((_exact_forward(s, s_st), None))
                continue
            if self.scheme.integer_zero:
                lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            s = (hi - lo) / (fmt.max - fmt.min)
            s = _exact_forward(torch.where(s > 0, s, s_st), s_st)
            z = fmt.min - lo / s
            out.append((s, _exact_forward(z, z_st.reshape(-1, 1))))
        return out, params

    def _values(self, grid, hard: bool):
        """Per part: the grid values of round(w / s + z + V) (hard: the codes instead, no gradient)."""
        fmt = self.scheme.fmt
        for p, v, (s, z) in zip(self.parts, self.V, grid):
            y = p / s
            if z is not None:
                y = y + z
            y = y + v
            if isinstance(fmt, IntFormat):
                if fmt.step != 1.0:
                    y = y / fmt.step
                k = torch.clamp(torch.round(y) if hard else round_ste(y), fmt.qmin, fmt.qmax)
                if hard:
                    yield fmt.encode_integers(k)
                    continue
                q = k * fmt.step if fmt.step != 1.0 else k
            else:
                codes = fmt.encode(y.detach(), saturate=True)
                if hard:
                    yield codes
                    continue
                q = y + (fmt.decode(codes) - y).detach()
            yield (q - z) * s if z is not None else q * s

    def weight(self) -> torch.Tensor:
        """The quantized weight [out, in], differentiable in V, alpha, beta."""
        grid, _ = self._grid()
        return self.view.merge(list(self._values(grid, hard=False)))

    @torch.no_grad()
    def qtensor(self) -> QTensor:
        grid, params = self._grid()
        codes = self.view.merge(list(self._values(grid, hard=True)))
        return dataclasses.replace(params, codes=pack_bits_le(codes.contiguous(), self.scheme.bits), scheme=self.scheme)


def _exact_forward(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """exact's value, approx's gradient: the stored scale (fp16, e8m0, ...) is what the weight uses."""
    return approx + (exact - approx).detach()


class GGMLRounding:
    """Learned rounding of one weight w [out, in] on a GGML block type's grid: V per weight on the codes
    of the type's own fit (its scales and offsets kept, computed on w by the type's reference search).

        r = GGMLRounding(w, "q4_k"); w_hat = r.weight(); blocks = r.blocks()   # [out, bytes] uint8"""

    def __init__(self, w: torch.Tensor, type_name: str):
        t = get_type(type_name)
        if t.fit is None:
            raise ValueError(f"GGML type {type_name!r} has no grid to learn rounding on (a float type)")
        R, C = w.shape
        if C % t.block_size:
            raise ValueError(f"GGML type {type_name!r} needs rows that are a multiple of {t.block_size} values, got {C}")
        self.t, self.shape = t, (R, C)
        self.w = w.detach().float()
        self.fit = t.fit(np.ascontiguousarray(self.w.numpy()).reshape(-1, t.block_size))
        f = self.fit
        self.S = torch.from_numpy(np.repeat(f.scale, f.sub, axis=1)).reshape(R, C)
        self.O = torch.from_numpy(np.repeat(f.offset, f.sub, axis=1)).reshape(R, C)
        self.levels = torch.from_numpy(f.levels)
        self.live = self.S != 0  # a block of zero scale keeps the fit's codes
        self.u = (self.w - self.O) / torch.where(self.live, self.S, torch.ones_like(self.S))
        self.rtn = torch.from_numpy(f.codes.astype(np.int64)).reshape(R, C)
        step = np.diff(f.levels)
        self.uniform = bool(len(step)) and bool((step == step[0]).all())
        self.V = torch.zeros(R, C, requires_grad=True)

    @property
    def rounding(self) -> list[torch.Tensor]:
        return [self.V]

    @property
    def clipping(self) -> list[torch.Tensor]:
        return []

    def _index(self, y: torch.Tensor) -> torch.Tensor:
        """Code index of the level nearest y (float, no gradient)."""
        k = len(self.levels)
        if self.uniform:
            step = float(self.levels[1] - self.levels[0])
            return torch.clamp(torch.round((y - self.levels[0]) / step), 0, k - 1)
        mid = (self.levels[1:] + self.levels[:-1]) / 2
        return torch.searchsorted(mid, y.detach().contiguous()).float()

    def weight(self) -> torch.Tensor:
        y = self.u + self.V
        idx = torch.where(self.live, self._index(y.detach()), self.rtn.float())
        q = y + (self.levels[idx.long()] - y).detach()
        return torch.where(self.live, self.S * q + self.O, self.S * self.levels[self.rtn] + self.O)

    @torch.no_grad()
    def codes(self) -> np.ndarray:
        idx = torch.where(self.live, self._index(self.u + self.V), self.rtn.float())
        return idx.to(torch.uint8).numpy()

    def blocks(self) -> np.ndarray:
        R = self.shape[0]
        return self.fit.pack(self.codes().reshape(-1, self.t.block_size)).reshape(R, -1)


def signround(w: torch.Tensor, scheme: Scheme, *, stats=None, steps: int = 200, lr: float | None = None,
              clip_lr: float | None = None, clip: bool = True, batch_windows: int = 4, seed: int = 0) -> QTensor:
    """The registry's entry: signround trains all layers of a block together, so lowbit.quantize runs it
    block by block (pipeline/learned_rounding.py) and this per-layer call only exists to say so. The
    keyword options are those of the block solve (steps, lr, clip_lr, clip, batch_windows, seed)."""
    raise ValueError("signround learns each block's rounding from the block's output: run it through "
                     "lowbit.quantize(model, recipe, method='signround', calibration=...)")


signround.needs = ("block",)
signround.block = True
