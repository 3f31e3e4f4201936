"""Quantize a safetensors checkpoint a part at a time, resumably: the model is never in memory whole.

The model is built on the meta device from its config (no memory); then each part (the embedding
table with the output layer, each repeated block, the rest) is read from the source shards
(memory-mapped, only that part's tensors, widened to float32 as lowbit.load_model would),
quantized by the same code as lowbit.quantize (pipeline.quantize with `modules=`), and its
tensors go to the output. A weight larger than `block_bytes` in float32 (the embedding table,
the output layer, an 8B model's MLP weights) is not loaded: a row-wise solver (rtn, mse) reads
and quantizes it `block_bytes` of rows at a time from the file (pipeline/rowwise.py,
io/safetensors_rows.py), so memory holds one block of rows, not the tensor. A calibrated
method (gptq) needs each block's inputs: streaming_calibrated.py runs the blocks in order with the
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

import contextlib
import errno
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import atomic, checks
from . import lowbit_checks as check
from ..version import __version__
from .lowbit_format import INDEX, META, VERSION, checkpoint_meta, model_entries
from .safetensors_rows import StoredTensor

JOURNAL = "journal.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


@dataclass
class Part:
    """A piece of the model quantized and written as one: module names it covers."""
    name: str
    modules: list[str]


@dataclass
class Journal:
    """What a run has finished: shards written (file name -> the parts in it) and the lowbit.json
    entries of the quantized modules in them. `digest` names the inputs it belongs to, `lowbit` the
    version that wrote it; `inputs` (calibrated methods): the block boundary whose inputs are saved,
    {"block", "folder", "batches"}."""
    digest: str
    shards: list[dict] = field(default_factory=list)
    modules: dict = field(default_factory=dict)
    inputs: dict | None = None
    lowbit: str = field(default_factory=lambda: __version__)

    def parts_done(self) -> set[str]:
        return {p for s in self.shards for p in s["parts"]}


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
    spilled to disk (streaming_calibrated.py); calibration_text: where the calibration windows lay
    in the text (lowbit.json's calibration_text). on_part(name, seconds): called after each part.
    ray: a streaming_ray.RayPool: the weights (data-free) or the layers' solves (calibrated) run as
    Ray tasks; the output is the same bytes.
    """
    from ..methods import method_needs
    from ..pipeline import get_recipe

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
    parts = model_parts(model)
    partial = out.parent / f".{out.name}.partial"
    batches = _calibration_batches(calibration) if calibrated else None
    journal = _open_journal(partial, _digest(src, where, recipe, shard_bytes, batches, calibration_dtype, batch_size))
    output = Output(partial, journal, shard_bytes, on_part)
    quantized = quantized_modules(model, recipe)
    try:
        if calibrated:
            from .streaming_calibrated import quantize_calibrated

            quantize_calibrated(model, recipe, parts, where, output, batches, quantized=quantized,
                                block_bytes=block_bytes, activation_bytes=activation_bytes,
                                calibration_dtype=calibration_dtype, batch_size=batch_size, progress=progress,
                                ray=ray)
        elif ray is not None:
            from .streaming_ray import quantize_parts

            quantize_parts(model, recipe, parts, where, output, ray, block_bytes=block_bytes, progress=progress)
        else:
            bar = tqdm(parts, desc="quantize (streaming)", unit="part", disable=not progress)
            for part in bar:
                if part.name in output.done:  # in a shard an earlier run finished
                    continue
                bar.set_postfix_str(part.name)
                deferred = _materialize(model, part, where, quantized, block_bytes)
                _quantize_part(model, recipe, part, _row_solver(deferred, block_bytes))
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
    return _finish(model, src, partial, journal, out, source or str(src))


class Output:
    """The parts' tensors, gathered into shards of about shard_bytes and written as they fill;
    parts already in an earlier run's shards (`done`) are dropped, not written again."""

    def __init__(self, partial: Path, journal: "Journal", shard_bytes: int, on_part=None):
        import time

        self.partial, self.journal, self.shard_bytes, self.on_part = partial, journal, shard_bytes, on_part
        self.done = journal.parts_done()
        self.pending: dict[str, torch.Tensor] = {}
        self.parts: list[str] = []
        self._clock = time.perf_counter
        self._since = self._clock()

    def add(self, model: nn.Module, part: "Part") -> None:
        """Take the part's tensors (quantized or not) and free its modules."""
        # tied tensors are stored once; both ends lie in one part (the embeddings), and a part's
        # QTensors are freed after it, so a fresh owners table per part (ids get reused)
        tensors, modules = model_entries(model, {}, under=tuple(part.modules))
        _release(model, part)
        if part.name not in self.done:
            self.pending.update(tensors)
            self.journal.modules.update(modules)
            self.parts.append(part.name)
            if sum(t.nbytes for t in self.pending.values()) >= self.shard_bytes:
                self.close()
        if self.on_part is not None:
            self.on_part(part.name, self._clock() - self._since)
        self._since = self._clock()

    def close(self) -> None:
        """Write what is pending as a shard."""
        if self.pending:
            _write_shard(self.partial, self.journal, self.pending, self.parts)
        self.pending, self.parts = {}, []


def quantized_modules(model: nn.Module, recipe) -> set[str]:
    """Names of the modules whose weight the recipe rounds or solves (pipeline.weight_plan; a tied
    table and output layer under the table's name)."""
    from ..pipeline.quantize import weight_plan

    return set(weight_plan(model, recipe))


def _calibration_batches(calibration) -> list[torch.Tensor]:
    """Calibration as a list of token id tensors (the journal's digest covers them)."""
    batches = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in calibration]
    if not batches or any(x.is_floating_point() for x in batches):
        raise ValueError("calibration must be a non-empty list of token id tensors [batch, seq] for streaming")
    return batches


# -- reading the source -----------------------------------------------------------------------
def streams(src: str | Path) -> bool:
    """src is a Hugging Face checkpoint folder of safetensors (what quantize_checkpoint reads)."""
    src = Path(src)
    return src.is_dir() and (src / "config.json").is_file() and (
        (src / "model.safetensors.index.json").is_file() or (src / "model.safetensors").is_file())


def source_tensors(src: Path) -> dict[str, Path]:
    """tensor name -> the shard holding it, checked: the index's shards exist and hold what it says."""
    from safetensors import safe_open

    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a Hugging Face checkpoint folder: config.json is missing")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            where = {str(k): src / str(v) for k, v in weight_map.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is corrupt: {e}") from e
    elif (src / "model.safetensors").is_file():
        where = None
    else:
        raise ValueError(f"{src} has neither model.safetensors nor model.safetensors.index.json")
    found = {}
    for shard in sorted({*where.values()} if where else {src / "model.safetensors"}):
        if not shard.is_file():
            raise ValueError(f"{index}: shard {shard.name} is missing from {src}")
        try:
            with safe_open(str(shard), framework="pt") as f:
                found.update({k: shard for k in f.keys()})
        except Exception as e:  # safetensors raises its own error kinds for truncated or foreign files
            raise ValueError(f"{shard} is unreadable or truncated: {e}") from e
    if where:
        wrong = sorted(k for k, s in where.items() if found.get(k) != s)
        if wrong:
            raise ValueError(f"{index} does not match its shards: tensor {wrong[0]!r} is not in "
                             f"{where[wrong[0]].name} ({len(wrong)} such tensors)")
    return found


def skeleton(src: Path) -> nn.Module:
    """The model of src's config with its parameters on the meta device: module names and shapes,
    no memory. Buffers computed from the config (rotary frequencies) are real, so that a block
    loaded from disk runs (calibrated methods run the model a block at a time)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(src), local_files_only=True)
    except Exception as e:  # transformers raises several kinds for a bad config
        raise ValueError(f"{src / 'config.json'} is not a config transformers reads: {e}") from e
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered meanwhile moves to the meta device (what accelerate's
    init_empty_weights(include_buffers=False) does): modules allocate theirs uninitialised on
    the CPU, which costs no resident memory, and drop them at once."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def model_parts(model: nn.Module) -> list[Part]:
    """The embedding table with the output layer, then each repeated block, then the rest."""
    from ..pipeline.blocks import find_blocks
    from ..pipeline.embeddings import embedding_targets

    inputs, head = embedding_targets(model)
    first = [n for n, _ in inputs]
    tied = head is not None and any(head[1].weight is e.weight for _, e in inputs)
    if tied:
        first.append(head[0])  # one tensor: quantized once, stored once
    prefix, blocks = find_blocks(model)
    parts = [Part("embeddings", first)] + [Part(f"{prefix}.{i}", [f"{prefix}.{i}"]) for i in range(len(blocks))]
    if head is not None and not tied:  # its own part: the two largest tensors are never in memory together
        parts.append(Part("output", [head[0]]))
    covered = tuple(first) + (prefix,) + ((head[0],) if head else ())
    rest = [n for n, m in model.named_modules()
            if n and not _under(n, covered) and any(True for _ in m.parameters(recurse=False))]
    return parts + ([Part("rest", rest)] if rest else [])


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _materialize(model: nn.Module, part: Part, where: dict[str, Path], quantized: set[str] = frozenset(),
                 defer_bytes: int | None = None) -> "dict[str, StoredTensor]":
    """Load the part's tensors still on the meta device from the source shards (float32, as
    lowbit.load_model reads). The weights of `quantized` modules over `defer_bytes` in float32
    stay on meta (as float32): -> {module name: where its weight lies}, for _row_solver."""
    from safetensors import safe_open

    from .safetensors_rows import stored_tensors

    state = model.state_dict(keep_vars=True)
    keys = [k for k, v in state.items() if _under(k.rpartition(".")[0], part.modules) and v.is_meta]
    tensors, deferred = {}, {}
    if defer_bytes is not None:
        for k in keys:
            module = k.rpartition(".")[0]
            if (k.endswith(".weight") and module in quantized and k in where and state[k].dim() == 2
                    and state[k].numel() * 4 > defer_bytes):
                deferred[module] = stored_tensors(where[k])[k]
                tensors[k] = torch.empty(state[k].shape, dtype=torch.float32, device="meta")
    for shard in sorted({where[k] for k in keys if k in where and k not in tensors}):
        try:
            with safe_open(str(shard), framework="pt") as f:
                for k in keys:
                    if where.get(k) == shard and k not in tensors:
                        t = f.get_tensor(k)
                        tensors[k] = t.float() if t.is_floating_point() else t
        except Exception as e:  # safetensors' own error kinds, OSError: the file changed under the run
            raise ValueError(f"{shard} is unreadable or truncated (reading part {part.name}): {e}") from e
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in keys if k not in tensors and k not in tied]
    if missing:
        raise ValueError(f"the checkpoint has no tensor {missing[0]!r}, which the model's config needs")
    if not tensors:
        return deferred
    model.load_state_dict(tensors, strict=False, assign=True)
    if part.name == "embeddings" and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return deferred


def quantize_stored(t: StoredTensor, solver: str, scheme, options: dict, block_bytes: int):
    """The QTensor of the weight `t` on disk: read `block_bytes` of rows at a time for a row-wise
    solver, else read whole (a solver that needs the whole tensor). Also a Ray task's body."""
    from ..methods import METHODS
    from ..pipeline.rowwise import by_rows, quantize_by_rows

    if by_rows(solver, scheme, t.shape):
        return quantize_by_rows(t.read_rows, t.shape, solver, scheme, options, block_bytes=block_bytes)
    return METHODS[solver](t.read_rows(0, t.shape[0]).float(), scheme, **options)


def _row_solver(deferred: "dict[str, StoredTensor]", block_bytes: int):
    """pipeline.quantize's `solve` for the deferred weights (quantize_stored)."""
    def solve(name, solver, scheme, options):
        t = deferred.get(name)
        return None if t is None else quantize_stored(t, solver, scheme, options, block_bytes)
    return solve


def _quantize_part(model: nn.Module, recipe, part: Part, solve=None) -> None:
    from ..pipeline import quantize
    from ..pipeline.quantize import plan

    names = {n for n, _ in model.named_modules() if _under(n, part.modules)}
    if set(plan(model, recipe, allow_empty=True)) & names or part.name in ("embeddings", "output"):
        quantize(model, recipe, modules=names, progress=False, solve=solve)


def _release(model: nn.Module, part: Part) -> None:
    """Drop the part's memory: its modules become empty placeholders (the model never runs)."""
    from ..pipeline.walk import set_module

    for name in part.modules:
        set_module(model, name, nn.Identity())


# -- writing ------------------------------------------------------------------------------------
def _digest(src: Path, where: dict[str, Path], recipe, shard_bytes: int, calibration=None,
            calibration_dtype="auto", batch_size: int = 8) -> str:
    """What a journal must match to be resumed: the source files (names, sizes, times), the
    recipe, the shard size, the calibration (token ids, dtype, batch size) and lowbit's version."""
    h = hashlib.sha256()
    for shard in sorted(set(where.values())):
        st = shard.stat()
        h.update(f"{shard.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update((src / "config.json").read_bytes())
    h.update(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    h.update(f"{shard_bytes};{VERSION};{__version__}".encode())  # another lowbit may quantize otherwise
    if calibration is not None:
        for x in calibration:
            h.update(f"{tuple(x.shape)}:".encode() + x.to(torch.int64).numpy().tobytes())
        h.update(f"{calibration_dtype};{batch_size}".encode())
    return h.hexdigest()


def _open_journal(partial: Path, digest: str) -> Journal:
    """The journal of an earlier run with the same inputs, to resume; else a new one (the earlier
    run's folder is emptied, with a warning that says why it cannot be resumed)."""
    if (partial / JOURNAL).is_file():
        try:
            j = _read_journal(partial)
            why = _why_not_resumed(partial, j, digest)
        except ValueError as e:
            why = str(e)
        if why is None:
            return j
        warnings.warn(f"{partial} holds an earlier run that cannot be resumed: {why}; starting again", stacklevel=3)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    j = Journal(digest)
    _write_journal(partial, j)
    return j


def _why_not_resumed(partial: Path, j: Journal, digest: str) -> str | None:
    if j.lowbit != __version__:
        return f"it was started by lowbit {j.lowbit}, this is lowbit {__version__} (two versions' shards are not mixed)"
    if j.digest != digest:
        return "it had other inputs (source files, recipe, shard size or calibration)"
    return next((f"its shard {s['file']} is missing" for s in j.shards if not (partial / s["file"]).is_file()), None)


def _read_journal(partial: Path) -> Journal:
    """journal.json, every field checked: the file names in it are names inside `partial` (a
    path elsewhere would let _finish move, or a resume delete, any file)."""
    f = partial / JOURNAL
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{f} is corrupt: {e!r}") from e
    check.field(f, "(top level)", d, dict)
    extra = set(d) - {"digest", "shards", "modules", "inputs", "lowbit"}
    if extra:
        raise ValueError(f"{f}: unknown field {sorted(extra)[0]!r}")
    j = Journal(check.field(f, "digest", d.get("digest"), str), check.field(f, "shards", d.get("shards", []), list),
                check.field(f, "modules", d.get("modules", {}), dict),
                check.field(f, "inputs", d.get("inputs"), dict, allow_none=True),
                check.field(f, "lowbit", d.get("lowbit", "(unrecorded: an older one)"), str))
    for i, s in enumerate(j.shards):
        check.field(f, f"shards[{i}]", s, dict)
        checks.name_in(partial, s.get("file"), f, f"shards[{i}].file")
        for key in ("parts", "tensors"):
            if not all(isinstance(x, str) for x in check.field(f, f"shards[{i}].{key}", s.get(key), list)):
                raise ValueError(f"{f}: shards[{i}].{key} must be a list of names")
    if j.inputs is not None:
        checks.name_in(partial, j.inputs.get("folder"), f, "inputs.folder")
        for key in ("block", "batches"):
            if check.field(f, f"inputs.{key}", j.inputs.get(key), int) < 0:
                raise ValueError(f"{f}: inputs.{key} must be >= 0")
    return j


def _write_journal(partial: Path, journal: Journal) -> None:
    atomic.write_atomic(partial / JOURNAL, json.dumps(journal.__dict__, indent=1))


def _write_shard(partial: Path, journal: Journal, tensors: dict[str, torch.Tensor], parts: list[str]) -> None:
    """Shard K (temp file, fsync, rename), then the journal that names it."""
    from safetensors.torch import save_file

    name = f"model-{len(journal.shards) + 1:05d}.safetensors"
    tmp = partial / (name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp))
        atomic.fsync(tmp)
        os.replace(tmp, partial / name)
        journal.shards.append({"file": name, "parts": parts, "tensors": sorted(tensors)})
        _write_journal(partial, journal)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise ValueError(f"no space left on the device writing {partial / name}: the {len(journal.shards)} "
                             f"shards finished are kept in {partial}; free space and run the same command "
                             "again to resume") from e
        raise ValueError(f"cannot write {partial / name}: {e}; the finished shards are kept in {partial}") from e


def _finish(model: nn.Module, src: Path, partial: Path, journal: Journal, out: Path, source: str) -> Path:
    """Shards renamed -of-N, the index, tokenizer files, lowbit.json last; then the folder moves
    into place."""
    n = len(journal.shards)
    weight_map, total = {}, 0
    for i, s in enumerate(journal.shards, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        if (partial / s["file"]).exists():
            os.replace(partial / s["file"], partial / final)
        s["file"] = final
        total += (partial / final).stat().st_size
        weight_map.update({k: final for k in s["tensors"]})
    (partial / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                             "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, partial / name)
    (partial / JOURNAL).unlink()
    (partial / META).write_text(json.dumps(checkpoint_meta(model, journal.modules, source), indent=1))
    atomic.sync_tree(partial)
    if out.exists() and not (out.is_dir() and (out / META).is_file()):
        raise ValueError(f"{out} exists and is not a lowbit checkpoint: the result is kept in {partial}")
    atomic.replace_dir(partial, out)  # a checkpoint already there is replaced in one rename
    return out
