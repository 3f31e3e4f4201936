"""The sequential calibration runner: block by block, as GPTQ does.

    capture the inputs of block 0 (embeddings run once)
    for each block i:
        run it on every batch with hooks on its Linear layers -> InputStats
    equivalence transforms (AWQ, SmoothQuant scales folded into the block)
        quantize its layers (quantize_layer(name, stats) replaces each one)
        run the quantized block -> the inputs of block i+1
            (propagate="full": the full-precision outputs of the first run instead)

Only one block's inputs and outputs are held at a time; the report gives their
size, the process's peak RSS and, for every layer with a Hessian, the layer-wise
loss ||W X - Q X||^2 / ||W X||^2 of the chosen weights next to round-to-nearest's.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .blocks import BlockInput, capture_inputs, find_blocks, run_block
from .stats import InputStats, StatsCollector


@dataclass
class LayerReport:
    name: str
    method: str
    loss: float | None = None  # ||(W - Q) X||^2 / ||W X||^2 over the calibration tokens
    rtn_loss: float | None = None


@dataclass
class CalibrationReport:
    blocks: str = ""
    tokens: int = 0
    layers: list[LayerReport] = field(default_factory=list)
    activations_mb: float = 0.0  # largest set of block inputs + outputs held at once
    stats_mb: float = 0.0  # largest set of one block's statistics
    peak_rss_mb: float = 0.0
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"sequential calibration over {self.blocks} ({self.tokens} tokens): {self.seconds:.1f} s, "
                 f"peak RSS {self.peak_rss_mb:.0f} MB, activations held {self.activations_mb:.0f} MB, "
                 f"statistics {self.stats_mb:.0f} MB"]
        with_loss = [r for r in self.layers if r.loss is not None and r.rtn_loss]
        if with_loss:
            ratios = torch.tensor([r.loss / r.rtn_loss for r in with_loss])
            lines.append(f"layer loss vs round-to-nearest: median {ratios.median():.3f}x, "
                         f"worst {ratios.max():.3f}x over {len(with_loss)} layers")
        return "\n".join(lines)


def run_sequential(model: nn.Module, names: list[str], batches: list,
                   quantize_layer: Callable[[str, InputStats], LayerReport], *, hessian: bool,
                   transform: Callable | None = None, propagate: str = "quantized",
                   progress: bool = True) -> CalibrationReport:
    """Quantize the layers `names` (full module names) of `model` block by block.

    transform(block, local names, stats, producers, sample input, block name) runs between
    the statistics and the solver (equivalence transforms, pipeline/transforms.py)."""
    if propagate not in ("quantized", "full"):
        raise ValueError(f"propagate={propagate!r}: choose 'quantized' or 'full'")
    t0 = time.perf_counter()
    prefix, blocks = find_blocks(model)
    outside = [n for n in names if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(f"layers {outside[:3]} lie outside the repeated blocks ({prefix}); a calibrated method "
                         "cannot reach them: exclude them or give them a data-free method in an override")
    report = CalibrationReport(blocks=f"{prefix} ({len(blocks)} x {type(blocks[0]).__name__})")
    inputs = capture_inputs(model, blocks[0], batches)
    report.tokens = sum(x.hidden.shape[:-1].numel() for x in inputs)
    for i, block in enumerate(tqdm(blocks, desc="calibrate+quantize", unit="block", disable=not progress)):
        head = f"{prefix}.{i}."
        local = [n[len(head):] for n in names if n.startswith(head)]
        with StatsCollector(block, local, hessian) as c:
            outs = []
            for b, inp in enumerate(inputs):
                c.batch = b
                y = run_block(block, inp)
                if propagate == "full":
                    outs.append(y)
        report.stats_mb = max(report.stats_mb, sum(s.nbytes for s in set(c.stats.values())) / 2**20)
        if transform is not None:
            transform(block, local, c.stats, c.producers, inputs[0], f"{prefix}.{i}")
        for n in local:
            report.layers.append(quantize_layer(head + n, c.stats[n]))
        if propagate == "quantized":
            outs = [run_block(block, inp) for inp in inputs]
        held = sum(x.hidden.numel() * x.hidden.element_size() + y.numel() * y.element_size()
                   for x, y in zip(inputs, outs))
        report.activations_mb = max(report.activations_mb, held / 2**20)
        inputs = [BlockInput(y, x.kwargs) for x, y in zip(inputs, outs)]
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report.seconds = time.perf_counter() - t0
    return report


def layer_loss(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - Q) X||^2 / ||W X||^2 from H = 2 X X^T / n."""
    d = (w - w_hat).float()
    return float((d @ H * d).sum() / (w.float() @ H * w.float()).sum().clamp(min=1e-30))
