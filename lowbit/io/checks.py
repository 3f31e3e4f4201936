"""What any reader checks before trusting a file: names stay inside their folder, and a model
a file describes is sized on the meta device before it is built.

A journal, an index or any file lowbit reads may name other files (shards, saved inputs). Such a
name comes from outside: an absolute path or `..` in it would let a later move, read or rmtree
reach any file. `name_in` is the one gate every such name passes.

    shard = name_in(folder, entry["file"], journal_path, "shards[0].file")   # folder / name
    model = on_meta(lambda: cls(config), path, "the config cannot build a model")
    model_bytes(model)                                                        # what building it for real takes
"""
from __future__ import annotations

from pathlib import Path


def name_in(folder: Path, name, where, what: str) -> Path:
    """folder / name, for `name` read from file `where` (its field `what`): a plain file or folder
    name (no separator, not '.' or '..'), so the path lies directly inside `folder`; else a
    ValueError naming the file, the field and the value."""
    ok = (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
          and not any(c in name for c in "/\\\0"))
    if not ok:
        raise ValueError(f"{where}: {what} is {str(name)[:80]!r}, which is not a plain name inside {folder}")
    return Path(folder) / name


def on_meta(build, where, what: str):
    """build() (a model constructor) run on the meta device: its modules and every shape, no
    memory, so the shapes a file's metadata asks for are checked before anything is allocated;
    any error the constructor raises becomes a ValueError naming the file."""
    import torch

    try:
        with torch.device("meta"):
            return build()
    except Exception as e:  # a constructor fed odd numbers raises anything (ZeroDivision, RuntimeError, ...)
        raise ValueError(f"{where}: {what}: {type(e).__name__}: {e}") from e


def model_bytes(model) -> int:
    """Bytes the model's parameters and buffers take once materialised (tied tensors counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
