"""The output of a streamed run and its journal: shards written as they fill, the journal that names
them (what a resume trusts), and the finished checkpoint moved into place."""
from __future__ import annotations

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

from ... import version
from .. import atomic, checks
from .. import lowbit_checks as check
from ..lowbit_format import INDEX, META, VERSION, checkpoint_meta, model_entries
from .parts import Part, release

JOURNAL = "journal.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


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
    lowbit: str = field(default_factory=lambda: version.__version__)

    def parts_done(self) -> set[str]:
        return {p for s in self.shards for p in s["parts"]}


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
        release(model, part)
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
            write_shard(self.partial, self.journal, self.pending, self.parts)
        self.pending, self.parts = {}, []


def digest(src: Path, where: dict[str, Path], recipe, shard_bytes: int, calibration=None,
            calibration_dtype="auto", batch_size: int = 8) -> str:
    """What a journal must match to be resumed: the source files (names, sizes, times), the
    recipe, the shard size, the calibration (token ids, dtype, batch size) and lowbit's version."""
    h = hashlib.sha256()
    for shard in sorted(set(where.values())):
        st = shard.stat()
        h.update(f"{shard.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update((src / "config.json").read_bytes())
    h.update(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    h.update(f"{shard_bytes};{VERSION};{version.__version__}".encode())  # another lowbit may quantize otherwise
    if calibration is not None:
        for x in calibration:
            h.update(f"{tuple(x.shape)}:".encode() + x.to(torch.int64).numpy().tobytes())
        h.update(f"{calibration_dtype};{batch_size}".encode())
    return h.hexdigest()


def open_journal(partial: Path, digest: str) -> Journal:
    """The journal of an earlier run with the same inputs, to resume; else a new one (the earlier
    run's folder is emptied, with a warning that says why it cannot be resumed)."""
    if (partial / JOURNAL).is_file():
        try:
            j = read_journal(partial)
            why = (f"it was started by lowbit {j.lowbit}, this is lowbit {version.__version__} (the shards of "
                   "two versions are not mixed)" if j.lowbit != version.__version__ else
                   "it had other inputs (source files, recipe, shard size or calibration)" if j.digest != digest else
                   next((f"its shard {s['file']} is missing" for s in j.shards if not (partial / s["file"]).is_file()),
                        None))
        except ValueError as e:
            why = str(e)
        if why is None:
            return j
        warnings.warn(f"{partial} holds an earlier run that cannot be resumed: {why}; starting again", stacklevel=3)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    j = Journal(digest)
    write_journal(partial, j)
    return j


def read_journal(partial: Path) -> Journal:
    """journal.json, every field checked: the file names in it are names inside `partial` (a
    path elsewhere would let finish move, or a resume delete, any file)."""
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


def write_journal(partial: Path, journal: Journal) -> None:
    atomic.write_atomic(partial / JOURNAL, json.dumps(journal.__dict__, indent=1))


def write_shard(partial: Path, journal: Journal, tensors: dict[str, torch.Tensor], parts: list[str]) -> None:
    """Shard K (temp file, fsync, rename), then the journal that names it."""
    from safetensors.torch import save_file

    name = f"model-{len(journal.shards) + 1:05d}.safetensors"
    tmp = partial / (name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp))
        atomic.fsync(tmp)
        os.replace(tmp, partial / name)
        journal.shards.append({"file": name, "parts": parts, "tensors": sorted(tensors)})
        write_journal(partial, journal)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise ValueError(f"no space left on the device writing {partial / name}: the {len(journal.shards)} "
                             f"shards finished are kept in {partial}; free space and run the same command "
                             "again to resume") from e
        raise ValueError(f"cannot write {partial / name}: {e}; the finished shards are kept in {partial}") from e


def finish(model: nn.Module, src: Path, partial: Path, journal: Journal, out: Path, source: str) -> Path:
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
