"""Statistics of a Linear layer's inputs, collected over calibration batches.

    hessian   2/n * sum x x^T          (GPTQ; the layer-wise loss is tr(D H D^T), D = W - Q)
    absmax    max |x| per input channel (SmoothQuant)
    absmean   mean |x| per input channel (AWQ)

Layers that read the very same input tensor (q/k/v after one norm, gate/up)
share one InputStats, so the Hessian of a block input is computed once.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.phases import phase
from .walk import is_linear, is_norm


class InputStats:
    """product_dtype: the dtype X^T X is multiplied in, one batch at a time; the sum is always
    float32. bfloat16 halves the cost on CPUs with bf16 matmul; each batch's product is then
    rounded to bf16's 8 significant bits before the sum (on SmolLM2, GPTQ w4g64 calibrated
    in bf16 scores +11.45% Δppl against +11.82% in float32: docs/benchmarks.md)."""

    def __init__(self, dim: int, hessian: bool, product_dtype: torch.dtype = torch.float32,
                 magnitudes: bool = True):
        self.dim, self.n = dim, 0
        self._xtx = torch.zeros(dim, dim) if hessian else None
        self.product_dtype = product_dtype
        self.magnitudes = magnitudes  # absmax/absmean (SmoothQuant, AWQ); GPTQ alone needs none
        self.absmax = torch.zeros(dim)
        self._abssum = torch.zeros(dim, dtype=torch.float64)
        self._batch = -1
        self.cache: dict = {}  # what solvers derive from these statistics (a Hessian factor), shared

    def update(self, x: torch.Tensor, batch: int) -> None:
        if self._batch == batch:  # a layer sharing this input already counted it
            return
        self._batch = batch
        self.cache.clear()
        x = x.detach().reshape(-1, self.dim)
        self.n += x.shape[0]
        if self._xtx is not None:
            add_gram(self._xtx, x.to(self.product_dtype))  # one conversion (none when x already has that dtype)
        if self.magnitudes:
            a = x.abs()
            torch.maximum(self.absmax, a.amax(0).float(), out=self.absmax)
            # a batch's column sums in float32 (4 us per 1536 columns against 15 in float64), their total in float64
            self._abssum += a.sum(0, dtype=torch.float32)

    @property
    def hessian(self) -> torch.Tensor | None:
        return None if self._xtx is None else self._xtx * (2.0 / max(self.n, 1))

    @property
    def absmean(self) -> torch.Tensor:
        return (self._abssum / max(self.n, 1)).float()

    def scale_inputs(self, s: torch.Tensor) -> None:
        """The inputs became x / s (an equivalence transform): update every statistic exactly."""
        s = s.float()
        self.cache.clear()
        if self._xtx is not None:
            self._xtx /= s[:, None] * s[None, :]
        self.absmax /= s
        self._abssum /= s.double()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._xtx, self.absmax, self._abssum) if t is not None)


def add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc (float32 [n, n]) += x^T x for x [tokens, n], from the products of x's column halves: x^T x is
    symmetric, so three of the four quarter products give all of it (3/4 of the flops; 47 -> 38 ms for
    4096 x 1536 in bf16 on 2 Zen 4 cores). Each entry is the same dot product as in the whole product."""
    h = x.shape[1] // 2
    if h < 128:  # small products: one call is faster than three
        acc += (x.t() @ x).float()
        return
    a, b = x[:, :h], x[:, h:]
    cross = (a.t() @ b).float()
    acc[:h, :h] += (a.t() @ a).float()
    acc[:h, h:] += cross
    acc[h:, :h] += cross.t()
    acc[h:, h:] += (b.t() @ b).float()


class StatsCollector:
    """Hooks on `names` (Linear modules of `root`) that fill one InputStats per distinct input.

        with StatsCollector(block, names, hessian=True) as c:
            for i, batch in enumerate(batches): c.batch = i; block(batch)
        c.stats["self_attn.q_proj"]  # InputStats
        c.producers["self_attn.q_proj"]  # "input_layernorm": the norm whose output it reads

    `producers` names the normalisation module whose output tensor is exactly a layer's
    input (None when the input is computed otherwise); equivalence transforms fold
    their scales into it.

    stop_early: once every layer has seen the current batch, raise StatsComplete, so the
    rest of the block (down_proj's product, the residual) is not computed for nothing; the
    caller catches it. Only for callers that do not want the block's outputs.
    """

    def __init__(self, root: nn.Module, names: list[str], hessian: bool,
                 product_dtype: torch.dtype = torch.float32, stop_early: bool = False, magnitudes: bool = True):
        self.root, self.names, self.hessian, self.product_dtype = root, names, hessian, product_dtype
        self.magnitudes = magnitudes
        self.stop_early = stop_early
        self._seen: set[str] = set()
        self._seen_batch = -1
        self.stats: dict[str, InputStats] = {}
        self.producers: dict[str, str | None] = {}
        self.batch = 0
        self._outputs: dict[int, tuple[torch.Tensor, str]] = {}
        self._by_input: dict[int, tuple[torch.Tensor, InputStats]] = {}
        self._hooks = []

    def __enter__(self) -> "StatsCollector":
        for n in self.names:
            m = self.root.get_submodule(n)
            if not is_linear(m):
                raise ValueError(f"{n!r} is not a Linear layer")
            self._hooks.append(m.register_forward_pre_hook(lambda m, args, n=n: self._see(n, args[0])))
        for n, m in self.root.named_modules():
            if n and is_norm(m):
                self._hooks.append(m.register_forward_hook(lambda m, args, out, n=n: self._produced(n, out)))
        return self

    def _produced(self, name: str, out) -> None:
        if len(self.stats) < len(self.names) and isinstance(out, torch.Tensor):  # still tracing
            self._outputs[id(out)] = (out, name)

    def _see(self, name: str, x: torch.Tensor) -> None:
        st = self.stats.get(name)
        if st is None:
            # First sight: layers fed the same tensor object share statistics. Holding the
            # tensor keeps its id from being reused by a later input of the same batch.
            held = self._by_input.get(id(x))
            st = held[1] if held is not None else InputStats(x.shape[-1], self.hessian, self.product_dtype, self.magnitudes)
            self._by_input[id(x)] = (x, st)
            self.stats[name] = st
            self.producers[name] = self._outputs.get(id(x), (None, None))[1]
        elif self._by_input:
            self._by_input.clear()  # every layer has been seen once: sharing is settled
            self._outputs.clear()
        with phase("hessians" if self.hessian else "statistics"):
            st.update(x, self.batch)
        if self.stop_early:
            if self._seen_batch != self.batch:
                self._seen_batch, self._seen = self.batch, set()
            self._seen.add(name)
            if len(self._seen) == len(self.names):
                raise StatsComplete

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


class StatsComplete(Exception):
    """Raised by a StatsCollector hook when the batch's statistics are complete (stop_early)."""
