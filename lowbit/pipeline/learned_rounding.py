"""Learned rounding (methods/signround.py) block by block, inside the sequential runner.

The runner hands each block its quantized inputs X_q (what the blocks already quantized produce). Beside
them this module keeps the float model's own trajectory X_fp (block 0: the same tensors), as AutoRound
does, so each block learns to make up for the error of the blocks before it:

    targets = block_fp(X_fp)                     (float32, before any of the block's layers change)
    train every learned layer of the block on || block(X_q; W~) - targets ||^2, windows drawn in turn
    X_fp <- targets

The trained roundings wait in `learned` ({full module name: SchemeRounding | GGMLRounding}) until the
runner's per-layer step turns each into its QTensor or GGML blocks.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..methods.signround import signed_descent
from .blocks import BlockInput, run_block
from .sequential import compute_autocast
from .walk import linear_weight


class BlockRounding:
    """The runner's `solve_block` for learned rounding.

    make(full name, w [out, in]) -> a rounding (SchemeRounding / GGMLRounding) or None for a layer
    solved another way; options: signround's block options (steps, lr, clip_lr, batch_windows, seed);
    dtype: what the training forwards run in (bf16 where the CPU multiplies it natively)."""

    def __init__(self, make: Callable, options: dict, dtype: torch.dtype = torch.float32):
        self.make, self.dtype = make, dtype
        self.steps = int(options.get("steps", 200))
        self.lr, self.clip_lr = options.get("lr"), options.get("clip_lr")
        self.batch_windows = int(options.get("batch_windows", 4))
        self.seed = int(options.get("seed", 0))
        if self.batch_windows < 1:
            raise ValueError(f"signround batch_windows={self.batch_windows}: give 1 or more windows per step")
        self.fp: list[torch.Tensor] | None = None
        self.learned: dict[str, object] = {}
        self.losses: list[tuple[str, float, float]] = []  # (block, round to nearest's loss, the kept one)

    def __call__(self, block: nn.Module, local: list[str], inputs, where: str) -> None:
        head = where + "."
        mods = {n: block.get_submodule(n) for n in local}
        roundings = {n: r for n in local if (r := self.make(head + n, linear_weight(mods[n]).float())) is not None}
        batches = [(inp.hidden, inp.kwargs) for inp in inputs]
        if self.fp is None:
            self.fp = [h for h, _ in batches]
        with torch.no_grad():
            targets = [run_block(block, BlockInput(h, kw)).float() for h, (_, kw) in zip(self.fp, batches)]
        if roundings:
            first, best = self._train(block, mods, roundings, batches, targets)
            self.losses.append((where, first, best))
            self.learned.update({head + n: r for n, r in roundings.items()})
        self.fp = targets

    def _train(self, block, mods, roundings, batches, targets) -> tuple[float, float]:
        draw = _minibatches(batches, targets, self.batch_windows, self.seed)
        autocast = compute_autocast(self.dtype)
        names = {n: f"{n}.weight" for n in roundings}
        transposed = {n for n in roundings if type(mods[n]).__name__ == "Conv1D"}  # GPT-2 stores [in, out]

        def loss_of(step: int) -> torch.Tensor:
            hidden, kwargs, y = draw()
            weights = {names[n]: (r.weight().t() if n in transposed else r.weight()) for n, r in roundings.items()}
            with autocast:
                out = functional_call(block, weights, (hidden,), kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            return torch.nn.functional.mse_loss(out.float(), y)

        rounding = [p for r in roundings.values() for p in r.rounding]
        clipping = [p for r in roundings.values() for p in r.clipping]
        wanted = {p: p.requires_grad for p in block.parameters()}
        for p in wanted:  # only the roundings learn: no gradients for the block's own weights
            p.requires_grad_(False)
        try:
            return signed_descent(rounding, clipping, loss_of, steps=self.steps, lr=self.lr, clip_lr=self.clip_lr)
        finally:
            for p, flag in wanted.items():
                p.requires_grad_(flag)


def _minibatches(batches: list, targets: list, size: int, seed: int) -> Callable:
    """A function drawing (hidden, kwargs, target) of `size` windows per call, every window once per pass
    in a seeded random order. Windows of equal shape whose other arguments hold no per-window data
    (rotary tables, position ids of batch 1, no mask) are pooled across the stored batches; otherwise
    each call draws one stored batch whole."""
    g = torch.Generator().manual_seed(seed)
    if _poolable(batches):
        hidden = torch.cat([h for h, _ in batches])
        y = torch.cat(targets)
        kwargs = batches[0][1]
        size = min(size, len(hidden))
        order: list[int] = []

        def draw():
            nonlocal order
            if len(order) < size:
                order = order + torch.randperm(len(hidden), generator=g).tolist()
            idx, order = order[:size], order[size:]
            return hidden[idx], kwargs, y[idx]
        return draw
    order = []

    def draw_batch():
        nonlocal order
        if not order:
            order = torch.randperm(len(batches), generator=g).tolist()
        i = order.pop()
        return batches[i][0], batches[i][1], targets[i]
    return draw_batch


def _poolable(batches: list) -> bool:
    shape = batches[0][0].shape[1:]
    first = batches[0][1]
    for h, kw in batches:
        if h.shape[1:] != shape or kw.keys() != first.keys():
            return False
        for k, v in kw.items():
            if not _shared(v, first[k]):
                return False
    return True


def _shared(v, ref) -> bool:
    """v holds nothing per window (None, scalars, tensors of batch size 1 equal to ref's)."""
    if isinstance(v, (tuple, list)):
        return isinstance(ref, (tuple, list)) and len(v) == len(ref) and all(map(_shared, v, ref))
    if isinstance(v, torch.Tensor):
        return isinstance(ref, torch.Tensor) and v.dim() > 0 and v.shape[0] == 1 and v.shape == ref.shape \
            and bool(torch.equal(v, ref))
    return v is None or isinstance(v, (bool, int, float, str)) and v == ref
