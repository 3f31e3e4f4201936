"""`lowbit memory MODEL`: bytes of a model's weights per recipe, its KV cache and training state, from shapes."""
from __future__ import annotations

from .common import check_at_least, check_recipe, gguf_file_types


def register(sub) -> dict:
    pm = sub.add_parser("memory", help="memory of a model's weights per recipe, its KV cache and training state, "
                        "from shapes only (no weights are read)")
    pm.add_argument("model", help="smollm2-135m, minilm-l6, a Hugging Face folder, a lowbit checkpoint folder, "
                    "a .gguf or .safetensors file, or a parameter count such as 8B or 70B (a Llama-shaped model)")
    pm.add_argument("--recipe", action="append", metavar="R",
                    help="a recipe (w4g64, w4g64:hqq, ...), a dtype (fp32, bf16) or a GGUF file type (q8_0, "
                         "q4_k_m, ...); repeatable or comma separated (default: fp32, bf16 and the main recipes)")
    pm.add_argument("--context", type=int, default=0, help="tokens of KV cache to add (default 0: none)")
    pm.add_argument("--batch", type=int, default=1, help="sequences in the KV cache (default 1)")
    pm.add_argument("--kv-dtype", default="bf16", help="fp32, bf16 (default), fp16, fp8 or int8")
    pm.add_argument("--train", action="append", choices=("adamw", "adamw8bit", "qlora"),
                    help="add the training memory (gradients, optimizer states) of this regime (repeatable)")
    pm.add_argument("--lora-rank", type=int, default=16, help="LoRA rank for --train qlora (default 16)")
    pm.add_argument("--json", action="store_true", help="print the table as JSON")
    return {"memory": cmd_memory}


def cmd_memory(args) -> None:
    import json

    from ..analysis import format_memory, memory_table
    from ..analysis.memory import DEFAULT_RECIPES
    from ..analysis.run_dir import _plain

    recipes = check_args(args) or list(DEFAULT_RECIPES)
    t = memory_table(args.model, recipes, context=args.context, batch=args.batch, kv_dtype=args.kv_dtype,
                     train=args.train or (), lora_rank=args.lora_rank)
    print(json.dumps(_plain(t), indent=1) if args.json else format_memory(t))


def check_args(args) -> list[str]:
    """Every argument of `lowbit memory`, before any shape is read -> the recipes asked (empty: the default)."""
    from pathlib import Path

    from ..analysis.memory import DTYPE_ROWS, KV_BYTES
    from ..analysis.shapes import parse_size
    from ..io.builtin import BUILTIN
    from ..io.gguf.mixtures import ALIASES, FILE_TYPES

    if args.model not in BUILTIN and parse_size(args.model) is None and not Path(args.model).exists():
        raise ValueError(f"MODEL {args.model}: no such file or folder, not a built-in model ({', '.join(BUILTIN)}) "
                         "and not a parameter count such as 8B")
    check_at_least("--context", args.context, 0)
    check_at_least("--batch", args.batch)
    check_at_least("--lora-rank", args.lora_rank)
    if args.kv_dtype not in KV_BYTES:
        raise ValueError(f"--kv-dtype {args.kv_dtype}: choose one of {', '.join(KV_BYTES)}")
    recipes = [r.strip() for item in args.recipe or [] for r in item.split(",") if r.strip()]
    for spec in recipes:
        name, _, method = spec.partition(":")
        if name in DTYPE_ROWS or name in FILE_TYPES or name in ALIASES:
            if method:
                raise ValueError(f"--recipe {spec}: {name} takes no method")
            continue
        try:
            check_recipe(name, method or None)
        except ValueError as e:
            raise ValueError(f"{e}; dtypes: {', '.join(DTYPE_ROWS)}") from None
    if args.recipe and not recipes:
        raise ValueError(f"--recipe: give a recipe, dtype or GGUF file type ({gguf_file_types()})")
    return recipes
