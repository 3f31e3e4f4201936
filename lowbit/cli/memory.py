"""`lowbit memory MODEL`: bytes of a model's weights per recipe, its KV cache and training state, from shapes."""
from __future__ import annotations


def register(sub) -> dict:
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
    return {"memory": cmd_memory}


def cmd_memory(args) -> None:
    import json

    from ..analysis import format_memory, memory_table
    from ..analysis.memory import DEFAULT_RECIPES
    from ..analysis.run_dir import _plain

    recipes = ",".join(args.recipe) if args.recipe else list(DEFAULT_RECIPES)
    t = memory_table(args.model, recipes, context=args.context, batch=args.batch, kv_dtype=args.kv_dtype,
                     train=args.train or (), lora_rank=args.lora_rank)
    print(json.dumps(_plain(t), indent=1) if args.json else format_memory(t))
