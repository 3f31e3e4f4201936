"""Calibrated methods (gptq) over a checkpoint on disk, a block at a time.

lowbit.quantize runs a calibrated method block by block already (pipeline/sequential.py): the
embeddings quantized first, block 0's inputs captured, then for each block its statistics, the
solves, and its quantized forward for the next block's inputs. Here the same call runs on the
skeleton model (io/streaming.py) with two hooks:

- block_scope loads block i's weights from the source shards before its statistics, and after
  its quantized forward hands the quantized block to the output shards and drops it: one block's
  weights (float32) and its layers' statistics are in memory at a time;
- spill keeps at most `activation_bytes` of block inputs (and as much of outputs) in memory and
  writes the rest to safetensors files under the job's .partial folder (pipeline/spill.py).

Everything outside the blocks (embedding table, final norm, output layer) is loaded first; the
embedding table and the output layer, when quantized by a row-wise solver, are read and rounded
a block of rows at a time (pipeline/rowwise.py) and never held in float32.

The output is what lowbit.quantize gives in memory, tensor for tensor (tests/test_streaming_gptq.py).
Resuming after an interruption: the parts in finished shards are not written again, but the
blocks before the resume point run again (their outputs are the later blocks' inputs), so a
resumed calibrated job saves disk writes, not compute.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from torch import nn


def quantize_calibrated(model: nn.Module, recipe, parts: list, where: dict[str, Path], output, batches: list, *,
                        quantized: set[str], block_bytes: int, activation_bytes: int,
                        calibration_dtype="auto", batch_size: int = 8, progress: bool = True, ray=None) -> None:
    """Quantize `model` (the skeleton) part by part into `output` (streaming.Output); with `ray` (a
    streaming_ray.RayPool) each layer's solve is a Ray task, a block's layers at once."""
    from ..pipeline import quantize
    from ..pipeline.blocks import find_blocks
    from ..pipeline.spill import SpillPolicy
    from .streaming import _materialize, _row_solver

    prefix, _ = find_blocks(model)
    blocks = [p for p in parts if p.name.startswith(prefix + ".")]
    others = [p for p in parts if p not in blocks]
    deferred = {}
    for part in others:
        deferred.update(_materialize(model, part, where, quantized, block_bytes))
    first = others[0] if others and others[0].name == "embeddings" else None

    @contextlib.contextmanager
    def block_scope(i: int, block: nn.Module):
        if i == 0 and first is not None:  # quantized, and block 0's inputs captured: no longer needed
            output.add(model, first)
        _materialize(model, blocks[i], where)
        yield
        output.add(model, blocks[i])

    spill = SpillPolicy(activation_bytes, output.partial / "activations")
    solves = {} if ray is None else {"call_solver": ray.call_solver, "solve_workers": max(2, ray.width)}
    quantize(model, recipe, batches, solve=_row_solver(deferred, block_bytes), block_scope=block_scope,
             spill=spill, calibration_dtype=calibration_dtype, batch_size=batch_size, progress=progress, **solves)
    shutil.rmtree(spill.folder, ignore_errors=True)  # emptied block by block; not part of the checkpoint
    for part in others:
        if part is not first:
            output.add(model, part)
    if progress:
        print(model.lowbit_calibration.summary())
