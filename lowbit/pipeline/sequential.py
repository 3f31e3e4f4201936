"""The sequential calibration runner: block by block, as GPTQ does.

    capture the inputs of block 0 (embeddings run once)
    for each block i:
        run it on every batch with hooks on its Linear layers -> InputStats
    equivalence transforms (AWQ, SmoothQuant scales folded into the block)
        quantize its layers (quantize_layer(name, stats) replaces each one)
        run the quantized block -> the inputs of block i+1
            (propagate="full": the full-precision outputs of the first run instead)

The forwards run in bf16 where the CPU multiplies it natively (calibration_dtype), the
statistics pass stops once every layer has seen the batch, and the layers of a block are
solved two at a time. Only one block's inputs and outputs are held at a time; the report gives their
size, the process's peak RSS and, for every layer with a Hessian, the layer-wise
loss ||W X - Q X||^2 / ||W X||^2 of the chosen weights next to round-to-nearest's.

Two hooks serve io/streaming/, which never holds the whole model: `block_scope(i, block)`, a
context entered around block i's work (it loads the block's weights from disk, and writes and drops
the quantized block on leaving), and `spill`, a limit on the activations held in memory past which
they go to disk (spill.py); and `resume`, with which an interrupted streaming job starts at a later
block from that block's inputs saved at a boundary (io/streaming/calibrated.py): the inputs are all
that passes from one block to the next (the report covers the blocks run).
"""
from __future__ import annotations

import contextlib
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from ..core.hessian import native_bf16, output_error
from ..core.phases import PhaseClock, phase
from .blocks import BlockInput, capture_inputs, find_blocks, first_windows, run_block, short_batch
from .spill import Activations, SpillPolicy
from .stats import InputStats, StatsCollector, StatsComplete
from .walk import linear_weight


@dataclass
class LayerReport:
    name: str
    method: str
    loss: float | None = None  # ||(W - Q) X||^2 / ||W X||^2 over the calibration tokens
    rtn_loss: float | None = None
    tokens: int | None = None  # calibration tokens that reached the layer (routed ones, for an expert)
    fallback: str | None = None  # why the layer was rounded to nearest instead of solved


@dataclass
class CalibrationReport:
    blocks: str = ""
    tokens: int = 0
    dtype: str = "float32"  # what the calibration forwards ran in
    layers: list[LayerReport] = field(default_factory=list)
    activations_mb: float = 0.0  # largest set of block inputs + outputs held in memory at once
    spilled_mb: float = 0.0  # largest set written to disk at one block boundary (spill limit)
    stats_mb: float = 0.0  # largest set of one block's statistics
    peak_rss_mb: float = 0.0
    seconds: float = 0.0
    block_losses: list = field(default_factory=list)  # learned rounding: (block, loss at round to nearest, kept)
    # seconds by phase over all blocks: load (block_scope entered), statistics (forwards with the
    # Hessian products), transform, solve, forward (the quantized block), write (block_scope left)
    phases: dict[str, float] = field(default_factory=dict)
    block_seconds: list[float] = field(default_factory=list)
    # wall seconds by what the time went to (core/phases.py), summing to `seconds`: forwards, hessians, awq
    # search, ggml fits, gptq solves, layer losses, ...; the layer solves run in threads and count as their
    # shares of the wall time they took together. Callers add the time around the calibration as "read" and
    # "write" (then counted in `total_seconds`).
    profile: dict[str, float] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return self.seconds + self.profile.get("read", 0.0) + self.profile.get("write", 0.0)

    def profile_line(self) -> str:
        """'time by work (62.0 s): ggml fits 21.0 s (34%), forwards ...' over the total (read and write included)."""
        total = max(self.total_seconds, 1e-9)
        parts = [f"{k} {v:.1f} s ({100 * v / total:.0f}%)"
                 for k, v in sorted(self.profile.items(), key=lambda kv: -kv[1])]
        return f"time by work ({total:.1f} s): " + ", ".join(parts)

    def add_time(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def summary(self) -> str:
        lines = [f"sequential calibration over {self.blocks} ({self.tokens} tokens, {self.dtype}): "
                 f"{self.seconds:.1f} s, "
                 f"peak RSS {self.peak_rss_mb:.0f} MB, activations held {self.activations_mb:.0f} MB"
                 + (f" (+{self.spilled_mb:.0f} MB spilled to disk)" if self.spilled_mb else "")
                 + f", statistics {self.stats_mb:.0f} MB"]
        if self.phases:
            lines.append("seconds by phase: " + ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items()))
        if self.profile:
            lines.append(self.profile_line())
        with_loss = [r for r in self.layers if r.loss is not None and r.rtn_loss]
        if with_loss:
            ratios = torch.tensor([r.loss / r.rtn_loss for r in with_loss])
            lines.append(f"layer loss vs round-to-nearest: median {ratios.median():.3f}x, "
                         f"worst {ratios.max():.3f}x over {len(with_loss)} layers")
        if self.block_losses:
            ratios = torch.tensor([b / a for _, a, b in self.block_losses if a > 0])
            lines.append(f"block output loss vs round-to-nearest (learned rounding): median {ratios.median():.3f}x, "
                         f"worst {ratios.max():.3f}x over {len(ratios)} blocks")
        experts = [r for r in self.layers if ".experts." in r.name and r.tokens is not None]
        if experts:
            counts = torch.tensor([r.tokens for r in experts], dtype=torch.float64)
            fell = [r for r in experts if r.fallback]
            lines.append(f"experts: {len(experts)} layers, routed tokens per layer min {counts.min():.0f}, "
                         f"median {counts.median():.0f}, max {counts.max():.0f}"
                         + (f"; {len(fell)} rounded to nearest ({fell[0].fallback})" if fell else ""))
        return "\n".join(lines)

    def expert_tokens(self) -> dict[str, int]:
        """{expert layer name: calibration tokens routed to it}."""
        return {r.name: r.tokens for r in self.layers if ".experts." in r.name and r.tokens is not None}


def run_sequential(model: nn.Module, names: list[str], batches: list,
                   quantize_layer: Callable[[str, InputStats], LayerReport], *, hessian: bool,
                   magnitudes: bool = True,
                   transform: Callable | None = None, propagate: str = "quantized",
                   compute_dtype: "torch.dtype | str" = "auto", progress: bool = True,
                   block_scope: Callable | None = None, spill: SpillPolicy | None = None,
                   workers: int = 2, resume=None, solve_block: Callable | None = None) -> CalibrationReport:
    """Quantize the layers `names` (full module names) of `model` block by block.

    transform(block, local names, stats, producers, sample input, block name) runs between
    the statistics and the solver (equivalence transforms, pipeline/transforms.py).
    compute_dtype: what the calibration forwards and Hessian products run in (see
    calibration_dtype); the weights being quantized stay in their own precision.
    solve_block(block, local names, inputs, block name): runs after the transforms and before the
    layer solves, with the block's inputs (learned rounding trains a whole block there, learned_rounding.py).
    block_scope(i, block): a context manager entered around block i's statistics, solves and
    forward (see the module docstring); spill: hold activations past its limit on disk.
    workers: layer solves run at once (threads; each may wait on a Ray task, io/streaming/ray.py).
    resume: an object with `start` (the first block to run; those before it are left as they are),
    `inputs(into)` (appends block `start`'s inputs to `into` when start > 0, in place of capturing
    block 0's) and `save(i, inputs)` (called with block i's inputs before each block i > start runs)."""
    if propagate not in ("quantized", "full"):
        raise ValueError(f"propagate={propagate!r}: choose 'quantized' or 'full'")
    dtype = calibration_dtype(compute_dtype)
    t0 = time.perf_counter()
    clock = PhaseClock()
    with clock.running("other"):
        report = _run_blocks(model, names, batches, quantize_layer, hessian, magnitudes, transform, propagate, dtype,
                             progress, block_scope, spill, workers, resume, clock, solve_block)
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report.seconds = time.perf_counter() - t0
    report.profile = dict(clock.seconds)
    return report


def _run_blocks(model, names, batches, quantize_layer, hessian, magnitudes, transform, propagate, dtype, progress,
                block_scope, spill, workers, resume, clock, solve_block=None) -> CalibrationReport:
    prefix, blocks = find_blocks(model)
    outside = [n for n in names if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(f"layers {outside[:3]} lie outside the repeated blocks ({prefix}); a calibrated method "
                         "cannot reach them: exclude them or give them a data-free method in an override")
    report = CalibrationReport(blocks=f"{prefix} ({len(blocks)} x {type(blocks[0]).__name__})",
                               dtype=str(dtype).removeprefix("torch."))
    start = resume.start if resume is not None else 0
    inputs = Activations(spill, f"block-{start:05d}-in")
    if start > 0:
        resume.inputs(inputs)
    else:
        with phase("forwards"):
            capture_inputs(model, blocks[0], batches, into=inputs)
    report.tokens = inputs.tokens
    probe = _probe(model, blocks[0], batches) if transform is not None and start == 0 else None
    for i in tqdm(range(start, len(blocks)), desc="calibrate+quantize", unit="block", disable=not progress):
        block = blocks[i]
        t_block = time.perf_counter()
        if resume is not None and i > start:
            resume.save(i, inputs)
        with _Timed(report, "load", "write", block_scope(i, block) if block_scope is not None else None):
            # the last block's outputs feed nothing: no propagation forward for it
            last = i == len(blocks) - 1
            inputs = _one_block(i, block, inputs, prefix, names, quantize_layer, hessian, magnitudes, transform,
                                propagate if not last else "none", dtype, spill, report, workers, progress,
                                solve_block, clock, probe)
        report.block_seconds.append(time.perf_counter() - t_block)
    inputs.drop()
    return report


def _probe(model, first_block, batches) -> list | None:
    """[block 0's input for the first 64 tokens of the first window]: what a transform's fold is checked on
    (a norm that cannot absorb scales shows on any tokens), carried from block to block; None: check on the
    first window of each block's inputs."""
    short = short_batch(batches[0])
    if short is None:
        return None
    with phase("transform checks"):
        return capture_inputs(model, first_block, [short])


def _one_block(i, block, inputs: Activations, prefix, names, quantize_layer, hessian, magnitudes, transform,
               propagate, dtype, spill, report, workers=2, progress=False, solve_block=None, clock=None,
               probe=None) -> Activations:
    """Statistics, transforms, solves of block i; -> the inputs of block i + 1 (none with propagate="none")."""
    head = f"{prefix}.{i}."
    local = [n[len(head):] for n in names if n.startswith(head)]
    full = propagate == "full"
    outs = Activations(spill, f"block-{i + 1:05d}-in")
    work = _BlockWork(block, local, inputs.tokens // max(len(inputs), 1), hessian)
    bar = tqdm(total=work.total(len(inputs), propagate == "quantized"), desc=f"block {i}", unit="flop",
               unit_scale=True, leave=False, disable=not progress)
    t0 = time.perf_counter()
    with StatsCollector(block, local, hessian, product_dtype=dtype, stop_early=not full,
                        magnitudes=magnitudes) as c, compute_autocast(dtype), phase("forwards"):
        for b, inp in enumerate(inputs):
            c.batch = b
            try:
                y = run_block(block, inp)
            except StatsComplete:
                pass
            else:
                if full:
                    outs.append(y, inp.kwargs)
            bar.update(work.statistics)
    t1 = time.perf_counter()
    report.add_time("statistics", t1 - t0)
    report.stats_mb = max(report.stats_mb, sum(s.nbytes for s in set(c.stats.values())) / 2**20)
    if transform is not None:  # the sample checks a fold: a few tokens show a norm that cannot absorb scales
        sample = probe[0] if probe else first_windows(inputs[0], 1)
        transform(block, local, c.stats, c.producers, sample, f"{prefix}.{i}")
    t2 = time.perf_counter()
    report.add_time("transform", t2 - t1)
    if solve_block is not None:  # learned rounding trains the whole block here (counted as solve time)
        solve_block(block, local, inputs, f"{prefix}.{i}")

    solves = PhaseClock()

    def solve(n):
        with solves.running("solves (other)"):
            out = quantize_layer(head + n, c.stats.get(n))
        bar.update(work.solve[n])
        return out
    # Each layer's solve is independent; a Python-bound loop of small tensor ops (GPTQ's
    # columns) leaves a core idle, so two solves run at once (more when they are Ray tasks).
    with ThreadPoolExecutor(workers) as pool:
        report.layers.extend(pool.map(solve, local))
    t3 = time.perf_counter()
    report.add_time("solve", t3 - t2)
    if clock is not None:
        clock.absorb(solves, t3 - t2)
    if probe:
        with phase("transform checks"):
            probe[0] = BlockInput(run_block(block, probe[0]), probe[0].kwargs)
    if propagate == "quantized":
        with compute_autocast(dtype), phase("forwards"):
            for inp in inputs:
                outs.append(run_block(block, inp), inp.kwargs)
                bar.update(work.forward)
    report.add_time("forward", time.perf_counter() - t3)
    bar.close()
    report.activations_mb = max(report.activations_mb, (inputs.memory_bytes + outs.memory_bytes) / 2**20)
    report.spilled_mb = max(report.spilled_mb, (inputs.disk_bytes + outs.disk_bytes) / 2**20)
    inputs.drop()
    return outs


class _Timed:
    """Enters `scope` (a context manager or None) and adds the seconds spent entering it and leaving
    it to the report's phases `enter` and `leave`."""

    def __init__(self, report: CalibrationReport, enter: str, leave: str, scope):
        self.report, self.names, self.scope = report, (enter, leave), scope

    def __enter__(self):
        t0 = time.perf_counter()
        if self.scope is not None:
            self.scope.__enter__()
        self.report.add_time(self.names[0], time.perf_counter() - t0)

    def __exit__(self, *exc):
        t0 = time.perf_counter()
        try:
            return self.scope.__exit__(*exc) if self.scope is not None else None
        finally:
            self.report.add_time(self.names[1], time.perf_counter() - t0)


class _BlockWork:
    """Floating-point operations of a block's steps (integers), so that its progress bar's ETA holds
    across steps of unequal cost: per batch the forward (2 per weight and token) and, in the
    statistics pass, the X^T X products (2 n^2 per token, at most one per layer); per layer the
    solve (GPTQ: its column updates and layer losses, ~7 rows x cols^2, and a share of the
    Hessian's factor, ~cols^3)."""

    def __init__(self, block: nn.Module, local: list[str], tokens: int, hessian: bool):
        shapes = {n: tuple(linear_weight(block.get_submodule(n)).shape) for n in local}
        weights = sum(r * c for r, c in shapes.values())
        products = sum(2 * c * c for _, c in shapes.values()) if hessian else 0
        self.forward = 2 * tokens * weights
        self.statistics = self.forward + tokens * products
        self.solve = {n: 7 * r * c * c + c ** 3 if hessian else r * c for n, (r, c) in shapes.items()}

    def total(self, batches: int, forward: bool) -> int:
        return batches * (self.statistics + (self.forward if forward else 0)) + sum(self.solve.values())


def compute_autocast(dtype: torch.dtype):
    """The context the calibration forwards run in: CPU autocast to `dtype` (bf16), or nothing for float32."""
    return torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def calibration_dtype(choice: "torch.dtype | str" = "auto") -> torch.dtype:
    """The dtype calibration runs in: "auto" is bfloat16 where the CPU multiplies bf16 natively
    (AVX512-BF16 or AMX: 2-3x the float32 speed), else float32.

    GPTQModel loads the whole model in bf16 on CPU for the same reason. Here only the
    forwards and the per-batch X^T X products are bf16: the statistics are summed in float32
    and the solvers work on the model's own weights."""
    if choice == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
             "float32": torch.float32}.get(choice, choice)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"calibration dtype {choice!r}: choose 'auto', 'bf16' or 'fp32'")
    return dtype


def layer_loss(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - Q) X||^2 / ||W X||^2 from H = 2 X X^T / n."""
    return float(output_error(w.float() - w_hat.float(), H) / output_error(w, H).clamp(min=1e-30))
