"""`lowbit quantize MODEL --recipe R --out PATH`: quantize a model and save it (a lowbit checkpoint,
compressed-tensors, or a .gguf file through quantize_gguf; `--budget` through quantize_budget)."""
from __future__ import annotations

from pathlib import Path

from .common import (add_text_options, calibration, check_model, check_out, check_positive,
                     check_recipe, check_text_options, gguf_file_types, method_options, read_text)
from .quantize_gguf import check_gguf_args, cmd_quantize_gguf, wants_gguf

FORMATS = ("lowbit", "compressed-tensors")


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
    pq.add_argument("--pre-tokenizer", metavar="NAME", help="a .gguf --out from a Hugging Face folder: llama.cpp's "
                    "pre-tokenizer name (e.g. llama-bpe) for a byte-level BPE tokenizer lowbit does not recognise")
    add_text_options(pq)
    return {"quantize": cmd_quantize}


def check_args(args):
    """Every argument of `lowbit quantize`, before anything is loaded -> the Recipe (None for a .gguf --out,
    which check_gguf_args checked)."""
    from ..io.streaming import streams

    check_model(args.model, source_model=True)
    check_text_options(args)
    check_positive("--shard-size", args.shard_size)
    check_positive("--activation-memory", args.activation_memory)
    if wants_gguf(args):  # --out x.gguf: llama.cpp file types, a separate path
        if args.ray or args.ray_address:
            raise ValueError("--ray spreads the streaming quantization to a lowbit checkpoint, not a .gguf --out")
        if args.budget is not None:
            raise ValueError("--budget writes a lowbit checkpoint; a .gguf --out takes llama.cpp's file types")
        if args.format != "lowbit":
            raise ValueError(f"--format {args.format}: an --out ending in .gguf writes GGUF; drop --format")
        check_gguf_args(args)
        return None
    if args.pre_tokenizer is not None:
        raise ValueError("--pre-tokenizer names llama.cpp's split in a GGUF file; give an --out ending in .gguf")
    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format}: choose {' or '.join(FORMATS)}, or give an --out ending in .gguf "
                         f"for llama.cpp (with a GGUF file type as --recipe: {gguf_file_types()})")
    recipe = check_recipe(args.recipe, args.method)
    if args.method_option:
        recipe = recipe.replace(method_options=_checked_options(args.method_option, recipe))
    candidates = []
    if args.budget is not None:
        candidates = _check_budget(args.budget, args.candidates)
    elif args.candidates:
        raise ValueError("--candidates: the recipes --budget chooses from; give --budget too")
    if args.format == "compressed-tensors":
        check_compressed_tensors(recipe, args, [c.weights for c in candidates])
    if (args.ray or args.ray_address) and not (args.format == "lowbit" and args.budget is None
                                               and streams(args.model) and not recipe.observer):
        raise ValueError("--ray spreads the streaming quantization of a Hugging Face safetensors folder (weight-only "
                         f"recipe, lowbit format, no --budget); {args.model} is quantized in memory here")
    check_out(args.out, args.force, writes=args.format)
    return recipe


def _checked_options(items: list[str], recipe) -> dict:
    """--method-option: each names a method of the recipe's chain and one of its keyword options."""
    from ..methods import check_method_options, parse_method

    options = method_options(items, recipe.method_options)
    transforms, solver = parse_method(recipe.method)
    chain = {*transforms, solver}
    for method in options:
        if method not in chain:
            raise ValueError(f"--method-option {method}.*: {method} is not in the method chain {recipe.method!r} "
                             f"(its methods: {', '.join(sorted(chain))}); choose the chain with --method")
    try:
        return check_method_options(options)
    except ValueError as e:
        raise ValueError(f"--method-option: {str(e).removeprefix('method_options: ')}") from None


def _check_budget(budget: float, candidates: str | None) -> list:
    """--budget within the candidates' bits per weight (on 4096-wide layers), each candidate a weight recipe."""
    from ..analysis.sensitivity import DEFAULT_CANDIDATES, candidate_recipes
    from ..core.layout import qtensor_layout

    names = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else list(DEFAULT_CANDIDATES)
    for name in names:
        check_recipe(name, option="--candidates")
    try:
        recipes = candidate_recipes(names)
    except ValueError as e:
        raise ValueError(f"--candidates {candidates}: {e}") from None
    bits = {r.name: qtensor_layout((4096, 4096), r.weights).bits_per_weight for r in recipes}
    low, high = min(bits.values()), max(bits.values())
    if not low <= budget <= high:
        raise ValueError(f"--budget {budget:g}: the candidates ({', '.join(f'{k} {v:.2f}' for k, v in bits.items())}"
                         f" bits/w on 4096-wide layers) reach {low:.2f}-{high:.2f}; give a budget in that range")
    return recipes


def check_compressed_tensors(recipe, args, candidate_schemes=()) -> None:
    """--format compressed-tensors: the recipe's weight (and activation) schemes have a compressed-tensors
    layout, checked on a stand-in layer as io.compressed_tensors.ct_scheme checks each real one."""
    from types import SimpleNamespace

    import torch

    from ..io.compressed_tensors import ct_scheme

    if recipe.outlier_threshold is not None:
        raise ValueError(f"--recipe {args.recipe} --format compressed-tensors: LLM.int8() (outlier columns in full "
                         "precision) has no compressed-tensors layout; use --format lowbit")
    act_scale = torch.ones(1) if recipe.observer else None
    act_zero = torch.zeros(1) if recipe.observer and not recipe.activations.symmetric else None
    for scheme in {recipe.weights, *candidate_schemes}:
        stand_in = SimpleNamespace(scheme=scheme, shape=(256, 4096))
        try:
            ct_scheme(stand_in, recipe.activations, act_scale, act_zero, where=f"--recipe {args.recipe}")
        except ValueError as e:
            raise ValueError(f"{e} (--format compressed-tensors takes int, fp8 or nvfp4 recipes such as "
                             "w4g64-sym, w8, fp8, w8a8-dynamic, fp8-dynamic, nvfp4; or use --format lowbit)") from None
    try:
        import compressed_tensors  # noqa: F401  (optional dependency)
    except ImportError:
        raise ValueError("--format compressed-tensors needs the compressed-tensors package: "
                         "pip install compressed-tensors") from None


def cmd_quantize(args) -> None:
    from ..eval import token_ids
    from ..io import load_model, save
    from ..io.streaming import quantize_checkpoint, streams
    from ..methods import method_needs
    from ..pipeline import quantize

    recipe = check_args(args)  # every argument, before anything is loaded
    if recipe is None:
        return cmd_quantize_gguf(args)
    out = Path(args.out)
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
