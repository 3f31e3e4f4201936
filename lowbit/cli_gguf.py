"""`lowbit quantize SRC --recipe q4_0 --out model.gguf`: the GGUF path of the quantize command.

Kept apart from cli.py so the lowbit-checkpoint path stays as it is. Round to nearest in llama.cpp's
blocks (calibrated GGUF codes are not written yet: --method auto means rtn here).
"""
from __future__ import annotations

from pathlib import Path


def wants_gguf(args) -> bool:
    return Path(args.out).suffix == ".gguf"


def cmd_quantize_gguf(args) -> None:
    from .io import load, load_model, save
    from .io.gguf_mixtures import file_type

    file_type(args.recipe)  # fail on a bad name before loading anything
    if args.method not in ("auto", "rtn") or args.method_option:
        raise ValueError(f"--method {args.method}: GGUF export rounds to nearest in llama.cpp's blocks today; "
                         "use --method rtn (calibrated GGUF codes are planned)")
    if str(args.model).endswith(".gguf"):  # our reader: no tokenizer to build, it is copied from the file
        model, tok = load(args.model), None
    else:
        model, tok = load_model(args.model)
    out = save(model, args.out, format="gguf", recipe=args.recipe, tokenizer=tok,
               source=getattr(model, "lowbit_gguf_source", None))  # no GGUF source: tok is converted
    print(f"saved {args.recipe} (rtn) to {out} ({out.stat().st_size / 1e6:.1f} MB)")
