"""`lowbit quantize SRC --recipe q4_k_m --out model.gguf`: the GGUF path of the quantize command.

Kept apart from quantize.py so the lowbit-checkpoint path stays as it is. --method rtn rounds to nearest
in llama.cpp's blocks (byte for byte llama-quantize's output); auto (default) runs AWQ + GPTQ on
each tensor's own type, calibrated on --text (pipeline/gguf_calibrated.py), for every quantized
file type but q8_0 (8 bits: round to nearest is already within 0.3% of float).
"""
from __future__ import annotations

import time
from pathlib import Path

from .common import calibration_split, check_out, gguf_file_types, method_options, read_text

CALIBRATED = ("awq+gptq", "gptq", "awq", "signround", "awq+signround", "rotate+awq+gptq", "rotate+gptq", "rotate+awq")
SIGNROUND_OPTIONS = ("steps", "lr", "clip_lr", "batch_windows", "seed")


def wants_gguf(args) -> bool:
    return Path(args.out).suffix == ".gguf"


def gguf_method(recipe: str, method: str) -> str:
    from ..io.gguf.mixtures import ALIASES, FILE_TYPES, file_type
    from ..pipeline.recipe import RECIPES

    if recipe in RECIPES:
        raise ValueError(f"--recipe {recipe} is a lowbit recipe: it writes a checkpoint folder (an --out not ending "
                         f"in .gguf); a .gguf --out takes a GGUF file type: {gguf_file_types()}")
    if recipe not in FILE_TYPES and recipe not in ALIASES:
        raise ValueError(f"--recipe {recipe}: unknown GGUF file type; a .gguf --out takes {gguf_file_types()} "
                         f"(lowbit recipes, for a folder --out: {', '.join(RECIPES)})")
    ft = file_type(recipe)
    if method == "auto":
        return "rtn" if ft.default in ("f32", "f16", "bf16", "q8_0") else "awq+gptq"
    if method != "rtn" and method not in CALIBRATED:
        raise ValueError(f"--method {method}: a .gguf --out takes auto (default), rtn, {', '.join(CALIBRATED)}")
    return method


def check_gguf_args(args) -> str:
    """The GGUF path's own arguments (recipe, method, its options, --out), before anything is loaded
    -> the method that will run."""
    from ..io.gguf.tokenizer import check_pre_tokenizer

    method = gguf_method(args.recipe, args.method)
    _gptq_options(args.method_option, method)
    check_pre_tokenizer(args.pre_tokenizer, option="--pre-tokenizer")
    check_out(args.out, args.force, writes="gguf")
    return method


def cmd_quantize_gguf(args) -> None:
    from ..eval import token_ids
    from ..io import load, load_model, save
    import torch

    from ..io.models import checkpoint_dtype, load_gguf_tokenizer

    method = check_gguf_args(args)
    options = _gptq_options(args.method_option, method)
    out = Path(args.out)
    t0 = time.perf_counter()
    if str(args.model).endswith(".gguf"):  # our reader (transformers' dequantizes in Python: 20 s on 135M in f32)
        model = load(args.model)  # the output copies the tokenizer from the file; calibration text needs it here
        tok = None if method == "rtn" else load_gguf_tokenizer(Path(args.model))
    else:  # round to nearest reads each weight once: keep the checkpoint's own dtype (float32 is 2x the memory)
        model, tok = load_model(args.model, dtype=checkpoint_dtype(args.model) if method == "rtn" else torch.float32)
    read_s = time.perf_counter() - t0
    if method != "rtn":
        from ..io.gguf.calibrated import quantize_gguf

        calib, where = calibration_split(token_ids(tok, read_text(args.text)), args.window, args.calibration_windows)
        print(f"calibrating {method} on windows {where['first_window']}-{where['first_window'] + where['windows'] - 1}"
              f" of {args.window} tokens (the end of {args.text or 'the default text'})")
        quantize_gguf(model, args.recipe, calib, method=method, calibration_dtype=args.calibration_dtype, **options)
    t0 = time.perf_counter()
    out = save(model, out, format="gguf", recipe=args.recipe, tokenizer=tok, pre_tokenizer=args.pre_tokenizer,
               source=getattr(model, "lowbit_gguf_source", None))  # no GGUF source: tok is converted
    if method != "rtn":  # the report's profile with the time around the calibration: reading and writing
        report = model.lowbit_calibration
        report.profile.update(read=read_s, write=time.perf_counter() - t0)
        print(report.summary())
    print(f"saved {args.recipe} ({method}) to {out} ({out.stat().st_size / 1e6:.1f} MB)")


def _gptq_options(items: list[str] | None, method: str) -> dict:
    """--method-option gptq.damp=0.05 / gptq.act_order=false for the calibrated GGUF solve."""
    opts = method_options(items or [], {})
    if opts and method == "rtn":
        raise ValueError("--method-option: rtn GGUF export has no options")
    allowed = {"gptq": ("damp", "act_order"), "signround": SIGNROUND_OPTIONS}
    unknown = [f"{m}.{k}" for m, kw in opts.items() for k in kw if k not in allowed.get(m, ())]
    if unknown:
        raise ValueError(f"--method-option {unknown[0]}: calibrated GGUF export takes gptq.damp and gptq.act_order "
                         f"(gptq) or signround.{{{','.join(SIGNROUND_OPTIONS)}}} (signround)")
    out = dict(opts.get("gptq", {}))
    if "signround" in opts:
        out["signround"] = opts["signround"]
    return out
