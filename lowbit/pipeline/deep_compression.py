"""Deep Compression over a model: prune -> retrain -> share weights -> fine-tune centroids.

The math of each stage is methods/deep_compression.py; this module picks the Linear layers
(include/exclude patterns as in a Recipe), runs the short retraining loops and swaps each layer
for an nn.SharedLinear. Huffman coding happens when the model is written
(io.deep_compression.save_deep_compressed), because it changes the bytes, not the weights.

    report = deep_compress(model, sparsity=0.5, bits=5, batches=batches,
                           loss_fn=lambda m, b: m(b, labels=b).loss, prune_steps=20, share_steps=20)

Retraining touches the compressed layers only (their kept weights, then their centroids); every
other tensor keeps its values, so the file can store it unchanged. Dropout is left as the model's
mode has it (call model.eval() first for deterministic steps).
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from ..methods.deep_compression import magnitude_mask, share_weights
from ..nn import SharedLinear
from .recipe import DEFAULT_EXCLUDE
from .walk import set_module


@dataclass
class DeepCompressionReport:
    sparsity: float
    bits: int
    layers: list[str]
    prune_losses: list[float] = field(default_factory=list)
    share_losses: list[float] = field(default_factory=list)


def select_linears(model: nn.Module, include: Iterable[str] = ("*",),
                   exclude: Iterable[str] = DEFAULT_EXCLUDE) -> dict[str, nn.Linear]:
    """{name: nn.Linear} matched by the patterns (the embedding and the head are excluded by default)."""
    inc, exc = tuple(include), tuple(exclude)
    out = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
           and any(fnmatchcase(n, p) for p in inc) and not any(fnmatchcase(n, p) for p in exc)}
    if not out:
        raise ValueError(f"deep_compress: no nn.Linear of {type(model).__name__} matches include={list(inc)}, "
                         f"exclude={list(exc)}")
    return out


def prune(layers: dict[str, nn.Linear], sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the smallest |w| of each layer (the same sparsity per layer) -> {name: kept mask}."""
    masks = {}
    for name, m in layers.items():
        masks[name] = magnitude_mask(m.weight, sparsity)
        with torch.no_grad():
            m.weight.mul_(masks[name])
    return masks


def finetune(model: nn.Module, params: list[nn.Parameter], batches: list, loss_fn: Callable, steps: int, lr: float,
             after_step: Callable[[], None] | None = None, desc: str = "fine-tune", progress: bool = True) -> list[float]:
    """`steps` AdamW steps (no weight decay) on `params` over `batches`, cycled -> the losses."""
    if steps and not batches:
        raise ValueError(f"{desc}: {steps} steps need training batches (batches=[...])")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, it = [], itertools.cycle(batches)
    for _ in tqdm(range(steps), desc=desc, disable=not progress, unit="step"):
        loss = loss_fn(model, next(it))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        losses.append(float(loss.detach()))
    return losses


@contextlib.contextmanager
def _training_only(model: nn.Module, params: list[torch.Tensor]):
    """Within the block only `params` take gradients; the model's trainable parameters are given
    back their gradients after."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def retrain_pruned(model: nn.Module, layers: dict[str, nn.Linear], masks: dict[str, torch.Tensor], batches: list,
                   loss_fn: Callable, steps: int, lr: float = 5e-5, progress: bool = True) -> list[float]:
    """Retrain the kept weights of the pruned layers (every other parameter frozen, pruned weights
    held at zero) -> the losses."""
    weights = [m.weight for m in layers.values()]

    def reapply():  # Adam with zero gradients keeps zeros at zero; the mask makes it certain
        with torch.no_grad():
            for name, m in layers.items():
                m.weight.mul_(masks[name])
    with _training_only(model, weights):
        hooks = [m.weight.register_hook(lambda g, k=masks[name]: g * k) for name, m in layers.items()]
        try:
            return finetune(model, weights, batches, loss_fn, steps, lr, reapply, desc="retrain pruned",
                            progress=progress)
        finally:
            for h in hooks:
                h.remove()


def share(model: nn.Module, layers: dict[str, nn.Linear], masks: dict[str, torch.Tensor], bits: int,
          progress: bool = True) -> dict[str, SharedLinear]:
    """Each layer -> an nn.SharedLinear of 2^bits k-means clusters of its kept weights (in place)."""
    shared = {}
    for name, m in tqdm(layers.items(), desc="share weights", disable=not progress, unit="layer"):
        shared[name] = SharedLinear.from_linear(m, *share_weights(m.weight, masks[name], bits))
        set_module(model, name, shared[name])
    return shared


def finetune_centroids(model: nn.Module, shared: dict[str, SharedLinear], batches: list, loss_fn: Callable,
                       steps: int, lr: float = 1e-4, progress: bool = True) -> list[float]:
    """Train the centroids only (each by the summed gradient of its cluster) -> the losses."""
    centroids = [s.centroids for s in shared.values()]
    with _training_only(model, centroids):
        return finetune(model, centroids, batches, loss_fn, steps, lr, desc="fine-tune centroids", progress=progress)


def deep_compress(model: nn.Module, *, sparsity: float, bits: int, batches: list | None = None,
                  loss_fn: Callable | None = None, prune_steps: int = 0, share_steps: int = 0, lr: float = 5e-5,
                  centroid_lr: float = 1e-4, include: Iterable[str] = ("*",), exclude: Iterable[str] = DEFAULT_EXCLUDE,
                  progress: bool = True) -> DeepCompressionReport:
    """Prune each selected Linear to `sparsity`, retrain the kept weights for `prune_steps`, share
    them in 2^bits k-means clusters per layer (linear initialisation), fine-tune the centroids for
    `share_steps`. In place: the layers become nn.SharedLinear. loss_fn(model, batch) -> scalar."""
    if (prune_steps or share_steps) and loss_fn is None:
        raise ValueError("deep_compress: retraining steps need loss_fn(model, batch) -> loss")
    layers = select_linears(model, include, exclude)
    report = DeepCompressionReport(sparsity, bits, list(layers))
    masks = prune(layers, sparsity)
    if prune_steps:
        report.prune_losses = retrain_pruned(model, layers, masks, batches, loss_fn, prune_steps, lr, progress)
    shared = share(model, layers, masks, bits, progress)
    if share_steps:
        report.share_losses = finetune_centroids(model, shared, batches, loss_fn, share_steps, centroid_lr, progress)
    return report
