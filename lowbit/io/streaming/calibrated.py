"""Calibrated methods (gptq) over a checkpoint on disk, a block at a time.

lowbit.quantize runs a calibrated method block by block already (pipeline/sequential.py): the
embeddings quantized first, block 0's inputs captured, then for each block its statistics, the
solves, and its quantized forward for the next block's inputs. Here the same call runs on the
skeleton model (run.py) with two hooks:

- block_scope loads block i's weights from the source shards before its statistics, and after
  its quantized forward hands the quantized block to the output shards and drops it: one block's
  weights (float32) and its layers' statistics are in memory at a time;
- spill keeps at most `activation_bytes` of block inputs (and as much of outputs) in memory and
  writes the rest to safetensors files under the job's .partial folder (pipeline/spill.py).

Everything outside the blocks (embedding table, final norm, output layer) is loaded first; the
embedding table and the output layer, when quantized by a row-wise solver, are read and rounded
a block of rows at a time (pipeline/rowwise.py) and never held in float32.

The output is what lowbit.quantize gives in memory, tensor for tensor (tests/test_streaming_gptq.py).
Resuming after an interruption: a block's outputs are the next block's inputs, and they are all
that passes between blocks. So at each block boundary where every block before it lies in
finished shards, the next block's inputs (windows x tokens x hidden, plus the position arguments)
are saved under the .partial folder and named in the journal (io/block_inputs.py), replacing the
previous boundary's. A resumed job starts at the saved block: the blocks before it are neither
loaded nor solved, and only the blocks after it, whose parts no shard holds yet, run again (and
any between it and the first unfinished block, when a crash fell between a shard and the save).
The embedding table is read and rounded again (round to nearest, a row block at a time) since
pipeline.quantize quantizes it before the blocks. The output bytes are those of an uninterrupted
run.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

from torch import nn

from .. import checks
from . import block_inputs, parts
from .journal import write_journal


def quantize_calibrated(model: nn.Module, recipe, all_parts: list, where: dict[str, Path], output, batches: list, *,
                        quantized: set[str], block_bytes: int, activation_bytes: int,
                        calibration_dtype="auto", batch_size: int = 8, progress: bool = True, ray=None) -> None:
    """Quantize `model` (the skeleton) part by part into `output` (streaming.Output); with `ray` (a
    ray.RayPool) each layer's solve is a Ray task, a block's layers at once."""
    from ...pipeline import quantize
    from ...pipeline.blocks import find_blocks
    from ...pipeline.spill import SpillPolicy

    prefix, _ = find_blocks(model)
    blocks = [p for p in all_parts if p.name.startswith(prefix + ".")]
    others = [p for p in all_parts if p not in blocks]
    deferred = {}
    for part in others:
        deferred.update(parts.materialize(model, part, where, quantized, block_bytes))
    first = others[0] if others and others[0].name == "embeddings" else None
    resume = Boundaries(output, prefix)

    @contextlib.contextmanager
    def block_scope(i: int, block: nn.Module):
        if i == resume.start and first is not None:  # quantized, and the first inputs at hand: no longer needed
            output.add(model, first)
        parts.materialize(model, blocks[i], where)
        yield
        output.add(model, blocks[i])

    spill = SpillPolicy(activation_bytes, output.partial / "activations")
    solves = {} if ray is None else {"call_solver": ray.call_solver, "solve_workers": max(2, ray.width)}
    quantize(model, recipe, batches, solve=parts.row_solver(deferred, block_bytes), block_scope=block_scope,
             spill=spill, calibration_dtype=calibration_dtype, batch_size=batch_size, progress=progress,
             resume=resume, **solves)
    shutil.rmtree(spill.folder, ignore_errors=True)  # emptied block by block; not part of the checkpoint
    resume.forget()
    for part in others:
        if part is not first:
            output.add(model, part)
    if progress:
        print(model.lowbit_calibration.summary())


class Boundaries:
    """run_sequential's `resume`: where this job starts (the block whose inputs an earlier run saved
    and the journal names, else 0), and the saving of block boundaries for the next resume."""

    def __init__(self, output, prefix: str):
        self.output, self.prefix = output, prefix
        self.partial, self.journal = output.partial, output.journal
        self.start, self._batches, self._told = 0, 0, False
        saved = self.journal.inputs
        if saved is not None:
            try:
                folder = self._folder(saved)
                self._batches = block_inputs.batches(folder, digest=self.journal.digest, block=saved["block"])
                if self._batches != saved["batches"]:
                    raise ValueError(f"{folder} holds {self._batches} batches, the journal says {saved['batches']}")
                self.start = saved["block"]
            except ValueError as e:
                print(f"{e}: the earlier run's blocks run again from the first", file=sys.stderr)
                self.journal.inputs = None
        keep = saved["folder"] if self.start > 0 else None
        for stale in self.partial.glob("inputs-*"):  # a crash between a save and the journal naming it
            if stale.name != keep:
                shutil.rmtree(stale, ignore_errors=True)

    def _folder(self, saved: dict) -> Path:
        """The folder of saved inputs the journal names: a name inside the .partial folder, never a
        path elsewhere (a resume reads it, a later save deletes it)."""
        return checks.name_in(self.partial, saved.get("folder"), f"the journal in {self.partial}", "inputs.folder")

    def inputs(self, into) -> None:
        block_inputs.load(self._folder(self.journal.inputs), into, self._batches)

    def save(self, i: int, inputs) -> None:
        """Keep block i's inputs when every block before it lies in a finished shard (a resume
        redoes the blocks after the last finished shard anyway: their parts were lost)."""
        if self.output.pending or f"{self.prefix}.{i - 1}" not in self.journal.parts_done():
            return
        old = self.journal.inputs
        if old is not None and old["block"] == i:
            return
        folder = f"inputs-{i:05d}"
        try:
            block_inputs.save(self.partial / folder, inputs, digest=self.journal.digest, block=i)
        except block_inputs.NotSaved as e:  # the job runs on; a resume would start at the last saved block
            if not self._told:
                print(f"block inputs not saved for resuming ({e})", file=sys.stderr)
                self._told = True
            return
        self.journal.inputs = {"block": i, "folder": folder, "batches": len(inputs)}
        write_journal(self.partial, self.journal)
        if old is not None:
            shutil.rmtree(self._folder(old), ignore_errors=True)

    def forget(self) -> None:
        """The blocks are done: the saved inputs are no part of the checkpoint."""
        old, self.journal.inputs = self.journal.inputs, None
        if old is not None:
            write_journal(self.partial, self.journal)
            shutil.rmtree(self._folder(old), ignore_errors=True)
