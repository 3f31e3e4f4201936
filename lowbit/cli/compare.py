"""`lowbit compare MODEL --recipes ...`: quantize with several recipes and print one comparison table
(the main job); `--out RUN_DIR` also keeps table.json for `lowbit report`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import add_text_options, check_at_least, check_model, check_recipe, check_text_options, read_text

# w4g64 twice: round to nearest, and `auto` (AWQ scales then GPTQ), what `lowbit quantize` does by default
MAIN_RECIPES = "w8,w8a8-dynamic,fp8,nf4,w4g64:rtn,w4g64:auto,w4g64:hqq,mxfp4,nvfp4"


def register(sub) -> dict:
    pc = sub.add_parser("compare", help="quantize with several recipes and print one comparison table")
    pc.add_argument("model", nargs="?", default="smollm2-135m")
    pc.add_argument("--recipes", default=MAIN_RECIPES,
                    help=f"comma list, recipe[:method]; without a method, the recipe's own (round to nearest); "
                         f":auto as lowbit quantize picks (default {MAIN_RECIPES})")
    pc.add_argument("--windows", type=int, default=8,
                    help="evaluation windows, from the text's start (default 8)")
    pc.add_argument("--no-speed", action="store_true", help="skip the decode speed measurement")
    add_text_options(pc, calibration_windows=8)  # read after the evaluated windows; 8 keep the main job short
    pc.add_argument("--out", metavar="RUN_DIR", type=_run_dir, help="also write RUN_DIR/table.json (the table and "
                    "the model's memory per recipe) for `lowbit report RUN_DIR`")
    pc.add_argument("--force", action="store_true", help="replace an earlier run in RUN_DIR (its table.json; "
                    "its index.html, now stale, is removed)")
    return {"compare": cmd_compare}


def _run_dir(text: str) -> str:
    """--out RUN_DIR: refused before any work when it is a file or cannot be written."""
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder (new or existing) for the run")
    parent = next((q for q in (p.absolute(), *p.absolute().parents) if q.exists()), Path("/"))
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{parent} is not writable")
    return text


RUN_FILES = ("table.json", "index.html")  # what compare and report write in RUN_DIR


def check_args(args) -> list:
    """Every argument of `lowbit compare`, before anything is loaded -> the (recipe, method) specs."""
    from ..analysis import parse_specs

    try:
        specs = parse_specs(args.recipes)
    except ValueError as e:
        raise ValueError(f"--recipes {args.recipes!r}: {e}") from None
    for name, method in specs:
        check_recipe(name, method, option="--recipes")
    check_model(args.model, source_model=True)
    check_at_least("--windows", args.windows)
    check_text_options(args)
    earlier = [f for f in RUN_FILES if args.out and (Path(args.out) / f).exists()]
    if earlier and not args.force:
        raise ValueError(f"--out {args.out}: holds an earlier run ({', '.join(earlier)}); pass --force to replace it, "
                         "or choose a new folder")
    return specs


def cmd_compare(args) -> None:
    from tqdm import tqdm

    from ..analysis import compare_recipes
    from ..analysis.compare import format_row, is_encoder, table_footer, table_head
    from ..io import load_model

    specs = check_args(args)
    model, tok = load_model(args.model)
    tqdm.write(table_head("cosine" if is_encoder(model) else "ppl"), file=sys.stdout)  # each row as it is done, above the progress bars
    cmp = compare_recipes(model, tok, read_text(args.text), specs, window=args.window, windows=args.windows,
                          calibration_windows=args.calibration_windows, speed=not args.no_speed,
                          on_row=lambda r: tqdm.write(format_row(r), file=sys.stdout))
    print(table_footer(cmp))
    if args.out:
        save_compare(args, model, cmp)


def save_compare(args, model, cmp) -> None:
    """RUN_DIR/table.json: the comparison and the memory of the model for the compared recipes."""
    import dataclasses

    from ..analysis import memory_table, save_run

    (Path(args.out) / "index.html").unlink(missing_ok=True)  # drawn from the table this run replaces
    specs = ["fp32", "bf16"] + [r.recipe for r in cmp.rows if r.recipe not in ("fp32", "bf16")]
    memory = memory_table(model, specs, context=cmp.window, batch=1)
    memory = dataclasses.replace(memory, source=f"{args.model} ({memory.source})")
    print(f"wrote {save_run(args.out, str(args.model), cmp, memory)}; `lowbit report {args.out}` draws it")
