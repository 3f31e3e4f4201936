"""Quantize a safetensors checkpoint a part at a time, resumably: the model is never in memory whole.

The model is built on the meta device from its config (no memory); then each part (the embedding
table with the output layer, each repeated block, the rest) is read from the source shards
(memory-mapped, only that part's tensors, widened to float32 as lowbit.load_model would),
quantized by the same code as lowbit.quantize (pipeline.quantize with `modules=`), and its
tensors go to the output. A weight larger than `block_bytes` in float32 (the embedding table,
the output layer, an 8B model's MLP weights) is not loaded: a row-wise solver (rtn, mse) reads
and quantizes it `block_bytes` of rows at a time from the file (pipeline/rowwise.py,
io/streaming/rows.py), so memory holds one block of rows, not the tensor. A calibrated
method (gptq) needs each block's inputs: calibrated.py runs the blocks in order with the
sequential runner lowbit.quantize uses, one block's weights loaded at a time.

Output: a lowbit checkpoint folder with shards model-0000K-of-0000N.safetensors and
model.safetensors.index.json as Hugging Face writes them, lowbit.json last. While it runs,
everything lives in a hidden folder beside the target, `.NAME.partial`, with a journal
(journal.json) of the shards finished and the parts in them; a shard is written to a temporary
file and renamed, then the journal (the same way), so a crash (Ctrl-C, kill -9, power) leaves
only whole shards the journal names. Run the same command again and it resumes after the last
finished shard; the parts after it are quantized again (deterministically), so the result is
byte-identical to an uninterrupted run. The folder appears at the target only when whole.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from . import parts
from .journal import Output, digest, finish, open_journal
from .parts import model_parts, quantized_modules, row_solver
from .source import expert_renames, renamed, skeleton, source_tensors


def quantize_checkpoint(src: str | Path, recipe, out: str | Path, *, calibration=None,
                        calibration_dtype: "torch.dtype | str" = "auto", batch_size: int = 8,
                        activation_bytes: int = 4 << 30, shard_bytes: int = 2 << 30, block_bytes: int = 64 << 20,
                        source: str | None = None, calibration_text: dict | None = None, on_part=None,
                        ray=None, progress: bool = True) -> Path:
    """Quantize the Hugging Face checkpoint folder `src` (config.json + model.safetensors or its
    sharded index) with `recipe` into the lowbit checkpoint folder `out`; -> out.

    shard_bytes: output shard size; block_bytes: weights larger than this (float32) are read and
    quantized this many bytes of rows at a time (the output is the same bytes whatever it is).
    calibration (batches of token ids, as lowbit.quantize takes): for a calibrated solver (gptq),
    run block by block as lowbit.quantize runs it (calibration_dtype, batch_size alike), one
    block's weights in memory, and activations past `activation_bytes` per block boundary
    spilled to disk (calibrated.py); calibration_text: where the calibration windows lay
    in the text (lowbit.json's calibration_text). on_part(name, seconds): called after each part.
    ray: a ray.RayPool: the weights (data-free) or the layers' solves (calibrated) run as
    Ray tasks; the output is the same bytes.
    """
    from ...methods import method_needs
    from ...pipeline import get_recipe
    from ...pipeline.experts import unfuse_experts

    src, out = Path(src), Path(out)
    recipe = get_recipe(recipe)
    calibrated = bool(method_needs(recipe.method))
    if recipe.observer:
        raise ValueError(f"recipe {recipe.name or ''!r} calibrates static activation ranges over the whole model; "
                         "streaming quantization takes weight-only recipes (quantize it in memory)")
    if calibrated and calibration is None:
        raise ValueError(f"method {recipe.method!r} needs calibration data: pass calibration=batches of token ids "
                         "(or pick a data-free method: rtn, mse, hqq)")
    where = source_tensors(src)
    model = skeleton(src)
    if unfuse_experts(model):  # experts as Linear layers (nn.RoutedExperts), read under the checkpoint's names
        where = renamed(where, expert_renames(model.config.model_type))
    todo = model_parts(model)
    partial = out.parent / f".{out.name}.partial"
    batches = calibration_batches(calibration) if calibrated else None
    journal = open_journal(partial, digest(src, where, recipe, shard_bytes, batches, calibration_dtype, batch_size))
    output = Output(partial, journal, shard_bytes, on_part)
    quantized = quantized_modules(model, recipe)
    try:
        if calibrated:
            from .calibrated import quantize_calibrated

            quantize_calibrated(model, recipe, todo, where, output, batches, quantized=quantized,
                                block_bytes=block_bytes, activation_bytes=activation_bytes,
                                calibration_dtype=calibration_dtype, batch_size=batch_size, progress=progress,
                                ray=ray)
        elif ray is not None:
            from .ray import quantize_parts

            quantize_parts(model, recipe, todo, where, output, ray, block_bytes=block_bytes, progress=progress)
        else:
            bar = tqdm(todo, desc="quantize (streaming)", unit="part", disable=not progress)
            for part in bar:
                if part.name in output.done:  # in a shard an earlier run finished
                    continue
                bar.set_postfix_str(part.name)
                deferred = parts.materialize(model, part, where, quantized, block_bytes)
                parts.quantize_part(model, recipe, part, row_solver(deferred, block_bytes))
                output.add(model, part)
        output.close()
    except (OSError, ValueError) as e:
        if str(partial) in str(e):  # the message says already what is kept (a failed shard write)
            raise
        raise ValueError(f"{e}\n(the {len(journal.shards)} output shards finished are kept in {partial}: run the "
                         "same command again to resume after them)") from e
    model.lowbit_recipe = recipe
    if calibration_text is not None:
        model.lowbit_calibration_text = calibration_text
    return finish(model, src, partial, journal, out, source or str(src))


def calibration_batches(calibration) -> list[torch.Tensor]:
    """Calibration as a list of token id tensors (the journal's digest covers them)."""
    batches = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in calibration]
    if not batches or any(x.is_floating_point() for x in batches):
        raise ValueError("calibration must be a non-empty list of token id tensors [batch, seq] for streaming")
    return batches
