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


def check_out(path: str, force: bool, writes: str = "lowbit") -> Path:
    """Refuse an output path before any work is done. `writes`: "lowbit" or "compressed-tensors"
    (a checkpoint folder) or "gguf" (one .gguf file). What the command writes itself (a checkpoint
    folder of that kind, a file starting with the GGUF magic) is replaced with --force; anything
    else already there (an ordinary file, a folder of other things) never is."""
    out = Path(path)
    if out.exists():
        foreign = _foreign_output(out, writes)
        if foreign:
            raise ValueError(f"--out {out}: {foreign}; choose a new path (lowbit does not replace it, even with "
                             "--force)")
        if not force and (out.is_file() or any(out.iterdir())):
            raise ValueError(f"--out {out}: already exists; pass --force to replace it")
    parent = next((p for p in (out.absolute(), *out.absolute().parents) if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: {parent} is not writable")
    return out


GGUF_MAGIC = b"GGUF"


def _foreign_output(out: Path, writes: str) -> str | None:
    """Why the existing `out` is not something this command writes (None: it is, or an empty folder)."""
    if writes == "gguf":
        if out.is_dir():
            return "a folder already exists there, and a .gguf output is one file"
        with open(out, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                return "a file already exists there and it is not a GGUF file (it does not start with 'GGUF')"
        return None
    if not out.is_dir():
        return f"a file already exists there, and a {writes} checkpoint is a folder"
    if not any(out.iterdir()) or (out / "lowbit.json").is_file() or _is_compressed_tensors(out):
        return None
    return "the folder exists and is not a lowbit checkpoint"


def _is_compressed_tensors(folder: Path) -> bool:
    """A compressed-tensors folder (as `--format compressed-tensors` writes): config.json's quant_method."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return config["quantization_config"]["quant_method"] == "compressed-tensors"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check_at_least(option: str, value: "int | float", least: "int | float" = 1) -> None:
    """A count or size option: refuse a value below `least`, naming the option."""
    if value < least:
        raise ValueError(f"{option} {value:g}: give a number >= {least:g}")


def check_positive(option: str, value: float) -> None:
    """A size option (MB): refuse zero or less, naming the option."""
    if not value > 0:
        raise ValueError(f"{option} {value:g}: give a size above 0")


def check_text_options(args) -> None:
    """--text (an existing file), --window and --calibration-windows (>= 1)."""
    if args.text is not None and not Path(args.text).is_file():
        raise ValueError(f"--text {args.text}: no such file")
    check_at_least("--window", args.window, 2)  # a window predicts its tokens from the ones before
    check_at_least("--calibration-windows", args.calibration_windows)


def check_model(source: str, option: str = "MODEL", *, source_model: bool = False) -> None:
    """A model argument: a built-in name (its package installed) or an existing path; a .gguf file
    has its header and tensor table read (a truncated or corrupt file is refused now, not after
    minutes of loading). source_model: a full-precision model to quantize or compare with (a Hugging
    Face folder or a .gguf file, not a lowbit checkpoint)."""
    from ..io.builtin import BUILTIN, builtin_model_path

    if source in BUILTIN:
        builtin_model_path(source)  # a clear error when its package is missing
        return
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{option} {source}: no such file or folder, and not a built-in model "
                         f"({', '.join(BUILTIN)})")
    if path.is_file() and path.suffix == ".gguf":
        from ..io.gguf.file import parse_gguf
        parse_gguf(path)
    elif source_model and (path / "lowbit.json").is_file():
        raise ValueError(f"{option} {source}: a lowbit checkpoint (already quantized); give the full-precision "
                         "model it came from (its lowbit.json names it as source)")
    elif source_model and path.is_dir():
        from ..io.models import read_hf_config
        read_hf_config(path)
    elif source_model:
        raise ValueError(f"{option} {source}: give a Hugging Face model folder, a .gguf file or a built-in model "
                         f"({', '.join(BUILTIN)})")


def check_method(method: str) -> None:
    """--method: auto, a solver, a transform, or a chain such as awq+gptq (rotate+auto: rotate, then auto)."""
    from ..methods import METHODS, TRANSFORMS, parse_method

    if method == "auto":
        return
    try:
        parse_method(method.removesuffix("+auto") if method.endswith("+auto") else method)
    except ValueError as e:
        raise ValueError(f"--method {method}: {e}. Choose auto (the best measured for the recipe), a solver "
                         f"({', '.join(METHODS)}), a transform ({', '.join(TRANSFORMS)}), or a chain of "
                         "transforms then one solver, such as awq+gptq") from None


def gguf_file_types() -> str:
    from ..io.gguf.mixtures import ALIASES, FILE_TYPES

    return ", ".join([*FILE_TYPES, *ALIASES])


def check_recipe(name: str, method: str | None = None, option: str = "--recipe"):
    """A lowbit recipe name (and method) -> the Recipe; a GGUF file type or an unknown name is
    refused with the lists of both and where each writes."""
    from ..io.gguf.mixtures import ALIASES, FILE_TYPES
    from ..pipeline import get_recipe
    from ..pipeline.recipe import RECIPES

    if name in FILE_TYPES or name in ALIASES:
        raise ValueError(f"{option} {name} is a llama.cpp GGUF file type: it needs a GGUF output, "
                         f"--out NAME.gguf (lowbit recipes, for a folder: {', '.join(RECIPES)})")
    if name not in RECIPES:
        raise ValueError(f"{option} {name}: unknown recipe. lowbit recipes (a checkpoint folder): "
                         f"{', '.join(RECIPES)}; GGUF file types (`lowbit quantize` writes them to --out NAME.gguf): "
                         f"{gguf_file_types()}")
    if method is not None:
        check_method(method)
    return get_recipe(name, method)


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
