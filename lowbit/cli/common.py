"""What the subcommands share: their text options, output checks and calibration windows.

Every check here runs before a model is loaded, and speaks in the command line's words.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def add_text_options(sp, calibration_windows: int = 32) -> None:
    sp.add_argument("--text", help="a UTF-8 text file (default: Python's own documentation text)")
    sp.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    sp.add_argument("--calibration-windows", type=int, default=calibration_windows,
                    help="calibration windows for static activations and gptq/awq/smoothquant "
                         f"(default {calibration_windows})")


def read_text(path: str | None) -> str:
    """--text: the file's text, or the built-in default text."""
    from ..io import default_text

    if path is None:
        return default_text()
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--text {path}: no such file")
    return p.read_text(encoding="utf-8")


def method_options(items: list[str], base: dict) -> dict:
    """["gptq.damp=0.05", "smoothquant.alpha=0.8"] -> {"gptq": {"damp": 0.05}, ...} (values as JSON,
    else strings)."""
    out = {k: dict(v) for k, v in base.items()}
    for item in items:
        key, eq, value = item.partition("=")
        method, dot, option = key.partition(".")
        if not (eq and dot and method and option):
            raise ValueError(f"--method-option {item!r}: write METHOD.OPTION=VALUE, e.g. gptq.damp=0.05")
        try:
            out.setdefault(method, {})[option] = json.loads(value)
        except json.JSONDecodeError:
            out.setdefault(method, {})[option] = value
    return out


def check_out(path: str, force: bool) -> Path:
    """Refuse an output path before any work is done: an existing checkpoint needs --force, and
    anything else already there (a file, a folder of other things) is never replaced."""
    out = Path(path)
    if out.exists():
        is_checkpoint = out.is_dir() and (out / "lowbit.json").is_file()
        if out.is_dir() and not is_checkpoint and any(out.iterdir()):
            raise ValueError(f"--out {out}: the folder exists and is not a lowbit checkpoint; choose a new path")
        if (is_checkpoint or out.is_file()) and not force:
            raise ValueError(f"--out {out}: already exists; pass --force to replace it")
    parent = next((p for p in (out.absolute(), *out.absolute().parents) if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: {parent} is not writable")
    return out


def calibration_split(ids, window: int, n: int) -> tuple[list, dict]:
    """The last `n` windows of `ids` as calibration batches [1, window], and where they lie.

    Calibration takes windows from the end of the text and evaluation from its start, so the
    two are disjoint unless the text is too short for both (`lowbit eval` checks).
    """
    total = len(ids) // window
    n = min(n, total)
    first = total - n
    batches = [ids[i * window:(i + 1) * window][None] for i in range(first, total)]
    return batches, {"window": window, "first_window": first, "windows": n, "token_range": [first * window,
                                                                                              total * window]}


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def calibration(tok, args) -> tuple[list, dict]:
    """The calibration windows of --text and where they lie (saved in lowbit.json)."""
    from ..eval import token_ids

    text = read_text(args.text)
    calib, where = calibration_split(token_ids(tok, text), args.window, args.calibration_windows)
    where["text_sha256"] = text_digest(text)
    print(f"calibrating on windows {where['first_window']}-{where['first_window'] + where['windows'] - 1} "
          f"of {args.window} tokens (the end of {args.text or 'the default text'}); "
          "`lowbit eval` scores windows from its start")
    return calib, where
