"""`lowbit quantize MODEL --recipe R --out PATH`: quantize a model and save it (a lowbit checkpoint,
compressed-tensors, or a .gguf file through quantize_gguf; `--budget` through quantize_budget)."""
from __future__ import annotations

from pathlib import Path

from .common import add_text_options, calibration, check_out, method_options, read_text
from .quantize_gguf import cmd_quantize_gguf, wants_gguf


def register(sub) -> dict:
    pq = sub.add_parser("quantize", help="quantize a model and save it")
    pq.add_argument("model", help="smollm2-135m, minilm-l6, a Hugging Face folder or a .gguf file")
    pq.add_argument("--recipe", default="w4g64", help="recipe name (default w4g64)")
    pq.add_argument("--method", default="auto",
                    help="auto (default: the best measured for the recipe, calibrated on --text), rtn, mse, hqq, "
                         "gptq, awq, smoothquant, or a chain such as awq+gptq")
    pq.add_argument("--method-option", action="append", metavar="METHOD.OPTION=VALUE",
                    help="a keyword option of a method in the chain, e.g. gptq.damp=0.05 or "
                         "smoothquant.alpha=0.8 (repeatable; saved in the recipe)")
    pq.add_argument("--calibration-dtype", default="auto", choices=("auto", "bf16", "fp32"),
                    help="dtype of the calibration forwards (default auto: bf16 where the CPU has native bf16)")
    pq.add_argument("--budget", type=float, help="mixed precision: average bits per weight over the blocks' layers "
                    "(scales and zeros counted), e.g. 4.25; per-layer schemes chosen from --candidates")
    pq.add_argument("--candidates", help="with --budget: comma list of recipes (default w2g64,w3g64,nf4-dq,"
                    "w4g64-sym,w4g64,w8)")
    pq.add_argument("--out", required=True, help="output folder, or a .gguf file (--recipe q8_0, q4_0, q4_k_m, ...)")
    pq.add_argument("--force", action="store_true", help="replace an existing checkpoint at --out")
    pq.add_argument("--ray", action="store_true", help="run the streaming quantization's independent work as Ray "
                    "tasks (per weight for data-free methods, per layer solve for gptq) on a local Ray cluster; "
                    "needs `pip install lowbit[scale]`")
    pq.add_argument("--ray-address", metavar="ADDRESS", help="with --ray: an existing cluster (e.g. auto, "
                    "ray://head:10001); the checkpoint must be at the same path on every node (docs/scale.md)")
    pq.add_argument("--shard-size", type=float, default=2048, metavar="MB",
                    help="output shard size when a Hugging Face safetensors folder is quantized one block at a "
                         "time (an interrupted run resumes; default 2048 MB)")
    pq.add_argument("--activation-memory", type=float, default=4096, metavar="MB",
                    help="calibrated methods on a Hugging Face safetensors folder: calibration activations held in "
                         "memory per block boundary; past it they are spilled to disk (default 4096 MB)")
    pq.add_argument("--format", default="lowbit", help="lowbit (default) or compressed-tensors (for transformers "
                    "and vLLM; needs an int, fp8 or nvfp4 recipe such as w4g64-sym, w8, fp8, w8a8-dynamic, "
                    "fp8-dynamic, nvfp4); "
                    "an --out ending in .gguf writes GGUF")
    add_text_options(pq)
    return {"quantize": cmd_quantize}


def cmd_quantize(args) -> None:
    from ..eval import token_ids
    from ..io import load_model, save
    from ..io.streaming import quantize_checkpoint, streams
    from ..methods import method_needs
    from ..pipeline import get_recipe, quantize

    if (args.ray or args.ray_address) and wants_gguf(args):
        raise ValueError("--ray spreads the streaming quantization to a lowbit checkpoint, not a .gguf --out")
    if wants_gguf(args):  # --out x.gguf: llama.cpp file types, a separate path
        if args.budget is not None:
            raise ValueError("--budget writes a lowbit checkpoint; a .gguf --out takes llama.cpp's file types")
        return cmd_quantize_gguf(args)
    recipe = get_recipe(args.recipe, args.method)  # fail on a bad name before loading anything
    if (args.ray or args.ray_address) and not (args.format == "lowbit" and args.budget is None
                                               and streams(args.model) and not recipe.observer):
        raise ValueError("--ray spreads the streaming quantization of a Hugging Face safetensors folder (weight-only "
                         f"recipe, lowbit format, no --budget); {args.model} is quantized in memory here")
    if args.method_option:
        recipe = recipe.replace(method_options=method_options(args.method_option, recipe.method_options))
    out = check_out(args.out, args.force)
    if args.format == "lowbit" and args.budget is None and streams(args.model) and not recipe.observer:
        calibrated = bool(method_needs(recipe.method))
        print(f"streaming {args.model} one block at a time ({recipe.method}: "
              f"{'calibrated' if calibrated else 'data-free'})")
        calib, where = None, None
        if calibrated:
            from ..io.models import load_tokenizer
            calib, where = calibration(load_tokenizer(Path(args.model)), args)
        pool = None
        if args.ray or args.ray_address:
            from ..io.streaming.ray import RayPool
            pool = RayPool(args.ray_address)
            print(f"Ray: {pool.width} CPUs ({args.ray_address or 'a local cluster'})")
        out = quantize_checkpoint(args.model, recipe, out, calibration=calib, calibration_text=where,
                                  calibration_dtype=args.calibration_dtype,
                                  activation_bytes=int(args.activation_memory * 2 ** 20),
                                  shard_bytes=int(args.shard_size * 2 ** 20), ray=pool)
        print(f"saved {recipe.name or 'custom'} ({recipe.method}) to {out}")
        return
    model, tok = load_model(args.model)
    if args.budget is not None:  # per-layer schemes from the candidates, within the budget
        from .quantize_budget import budget_recipe
        recipe = budget_recipe(model, token_ids(tok, read_text(args.text)), args.budget, args.candidates,
                               recipe.method, args.window, args.calibration_windows)
    calib = None
    if recipe.observer or method_needs(recipe.method):
        calib, model.lowbit_calibration_text = calibration(tok, args)
    quantize(model, recipe, calibration=calib, calibration_dtype=args.calibration_dtype)
    if hasattr(model, "lowbit_calibration"):
        print(model.lowbit_calibration.summary())
    out = save(model, out, format=args.format, tokenizer=tok, source=str(args.model))
    print(f"saved {recipe.name or 'custom'} ({recipe.method}) to {out}")
