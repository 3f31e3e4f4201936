"""`lowbit memory`, `lowbit report` and the options they add to `formats` and `compare`."""
from __future__ import annotations


def register(sub) -> dict:
    """Add the analysis subcommands to the `lowbit` parser; -> {command: handler}."""
    pm = sub.add_parser("memory", help="memory of a model's weights per recipe, its KV cache and training state, "
                        "from shapes only (no weights are read)")
    pm.add_argument("model", help="smollm2-135m, minilm-l6, a Hugging Face folder, a .gguf or .safetensors file, "
                    "or a parameter count such as 8B or 70B (a Llama-shaped model)")
    pm.add_argument("--recipe", action="append", metavar="R",
                    help="a recipe (w4g64, w4g64:hqq, ...) or dtype (fp32, bf16); repeatable or comma "
                         "separated (default: fp32, bf16 and the main recipes)")
    pm.add_argument("--context", type=int, default=0, help="tokens of KV cache to add (default 0: none)")
    pm.add_argument("--batch", type=int, default=1, help="sequences in the KV cache (default 1)")
    pm.add_argument("--kv-dtype", default="bf16", help="fp32, bf16 (default), fp16, fp8 or int8")
    pm.add_argument("--train", action="append", choices=("adamw", "adamw8bit", "qlora"),
                    help="add the training memory (gradients, optimizer states) of this regime (repeatable)")
    pm.add_argument("--lora-rank", type=int, default=16, help="LoRA rank for --train qlora (default 16)")
    pm.add_argument("--json", action="store_true", help="print the table as JSON")
    pr = sub.add_parser("report", help="write RUN_DIR/index.html from what `lowbit compare --out RUN_DIR` left")
    pr.add_argument("run_dir")
    return {"memory": cmd_memory, "report": cmd_report}


def add_formats_plot(pf) -> None:
    pf.add_argument("--plot", nargs="+", metavar="FORMAT", help="draw these formats' values and rounding error")
    pf.add_argument("--out", default="formats.png", help="PNG for --plot (default formats.png)")


def _run_dir(text: str) -> str:
    """--out RUN_DIR: refused before any work when it is a file or cannot be written."""
    import argparse
    import os
    from pathlib import Path

    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder (new or existing) for the run")
    parent = next((q for q in (p.absolute(), *p.absolute().parents) if q.exists()), Path("/"))
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{parent} is not writable")
    return text


def add_compare_out(pc) -> None:
    pc.add_argument("--out", metavar="RUN_DIR", type=_run_dir, help="also write RUN_DIR/table.json (the table and the model's "
                    "memory per recipe) for `lowbit report RUN_DIR`")


def cmd_memory(args) -> None:
    import json

    from .analysis import format_memory, memory_table
    from .analysis.memory import DEFAULT_RECIPES
    from .analysis.run_dir import _plain

    recipes = ",".join(args.recipe) if args.recipe else list(DEFAULT_RECIPES)
    t = memory_table(args.model, recipes, context=args.context, batch=args.batch, kv_dtype=args.kv_dtype,
                     train=args.train or (), lora_rank=args.lora_rank)
    print(json.dumps(_plain(t), indent=1) if args.json else format_memory(t))


def cmd_report(args) -> None:
    from .analysis import write_report

    print(f"wrote {write_report(args.run_dir)}")


def formats_plot(args) -> None:
    from .analysis import plot_formats

    print(f"wrote {plot_formats(args.plot, args.out)}")


def save_compare(args, model, cmp) -> None:
    """RUN_DIR/table.json: the comparison and the memory of the model for the compared recipes."""
    from .analysis import memory_table, save_run

    specs = ["fp32", "bf16"] + [r.recipe for r in cmp.rows if r.recipe not in ("fp32", "bf16")]
    import dataclasses

    memory = memory_table(model, specs, context=cmp.window, batch=1)
    memory = dataclasses.replace(memory, source=f"{args.model} ({memory.source})")
    print(f"wrote {save_run(args.out, str(args.model), cmp, memory)}; `lowbit report {args.out}` draws it")
