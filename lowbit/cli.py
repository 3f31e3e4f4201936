"""The `lowbit` command: a thin layer over the library."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path

from . import formats


def _fmt_num(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else str(v)


def formats_table() -> str:
    head = f"{'format':<18} {'kind':<9} {'bits':>4} {'max':>12} {'min normal':>12} {'min subnormal':>14} " \
           f"{'epsilon':>10} {'range dB':>9}"
    rows = [head, "-" * len(head)]
    for name in formats.names():
        f = formats.get(name)
        rows.append(f"{name:<18} {f.kind:<9} {f.bits:>4} {_fmt_num(f.max):>12} {_fmt_num(f.smallest_normal):>12} "
                    f"{_fmt_num(f.smallest_subnormal):>14} {_fmt_num(f.eps):>10} {f.dynamic_range_db:>9.1f}")
    rows.append("fixed point qM.N (e.g. q3.4) and learned kmeans1..kmeans8 are accepted too.")
    return "\n".join(rows)


def explain_value(name: str, value: float) -> str:
    """How `value` is stored in format `name`: the code, its bit fields and the error."""
    import torch

    f = formats.get(name)
    code = int(f.encode(torch.tensor([value], dtype=torch.float64), saturate=True)[0])
    got = float(f.decode(torch.tensor([code]))[0])
    bits = format(code, f"0{f.bits}b")
    lines = [f"{name}: {value!r} -> {got!r}  (code {code}, 0b{bits})"]
    if isinstance(f, formats.FloatFormat):
        s, e, m = bits[0], bits[1:1 + f.exp_bits], bits[1 + f.exp_bits:]
        lines.append(f"  sign {s} | exponent {e} (unbiased {int(e, 2) - f.bias if int(e, 2) else 1 - f.bias}) "
                     f"| mantissa {m or '-'}")
    elif isinstance(f, formats.E8M0Format):
        lines.append(f"  exponent {bits} (2^{code - 127})")
    elif isinstance(f, formats.CodebookFormat):
        lines.append(f"  index {code} of {f.values.numel()} codebook values")
    err = got - value
    rel = abs(err) / abs(value) if value else 0.0
    lines.append(f"  error {err:+.6g} (relative {rel:.3%})")
    if got == float(f.round(torch.tensor([1.0], dtype=torch.float64))[0]) and value != 1.0 and abs(value - 1) < 0.5:
        lines.append(f"  in {name}, {value!r} and 1.0 look the same")
    return "\n".join(lines)


def _text(path: str | None) -> str:
    from .io import default_text

    if path is None:
        return default_text()
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--text {path}: no such file")
    return p.read_text(encoding="utf-8")


def _method_options(items: list[str], base: dict) -> dict:
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


def cmd_quantize(args) -> None:
    from .cli_gguf import cmd_quantize_gguf, wants_gguf
    from .eval import token_ids
    from .io import load_model, save
    from .io.streaming import quantize_checkpoint, streams
    from .methods import method_needs
    from .pipeline import get_recipe, quantize

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
        recipe = recipe.replace(method_options=_method_options(args.method_option, recipe.method_options))
    out = check_out(args.out, args.force)
    if args.format == "lowbit" and args.budget is None and streams(args.model) and not recipe.observer:
        calibrated = bool(method_needs(recipe.method))
        print(f"streaming {args.model} one block at a time ({recipe.method}: "
              f"{'calibrated' if calibrated else 'data-free'})")
        calib, where = None, None
        if calibrated:
            from .io.models import load_tokenizer
            calib, where = _calibration(load_tokenizer(Path(args.model)), args)
        pool = None
        if args.ray or args.ray_address:
            from .io.streaming_ray import RayPool
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
        from .cli_search import budget_recipe
        recipe = budget_recipe(model, token_ids(tok, _text(args.text)), args.budget, args.candidates, recipe.method,
                               args.window, args.calibration_windows)
    calib = None
    if recipe.observer or method_needs(recipe.method):
        calib, model.lowbit_calibration_text = _calibration(tok, args)
    quantize(model, recipe, calibration=calib, calibration_dtype=args.calibration_dtype)
    if hasattr(model, "lowbit_calibration"):
        print(model.lowbit_calibration.summary())
    out = save(model, out, format=args.format, tokenizer=tok, source=str(args.model))
    print(f"saved {recipe.name or 'custom'} ({recipe.method}) to {out}")


def _calibration(tok, args) -> tuple[list, dict]:
    """The calibration windows of --text and where they lie (saved in lowbit.json)."""
    from .eval import token_ids

    text = _text(args.text)
    calib, where = calibration_split(token_ids(tok, text), args.window, args.calibration_windows)
    where["text_sha256"] = text_digest(text)
    print(f"calibrating on windows {where['first_window']}-{where['first_window'] + where['windows'] - 1} "
          f"of {args.window} tokens (the end of {args.text or 'the default text'}); "
          "`lowbit eval` scores windows from its start")
    return calib, where


def check_disjoint(calibrated: dict | None, text: str, window: int, windows: int) -> str:
    """Refuse to score windows a checkpoint was calibrated on; say which windows are scored."""
    scored = f"windows 0-{windows - 1} of {window} tokens"
    if not calibrated or calibrated.get("text_sha256") != text_digest(text):
        return scored + (" (calibrated on another text)" if calibrated else "")
    start, _ = calibrated["token_range"]
    if windows * window > start:
        raise ValueError(f"this checkpoint was calibrated on tokens {start}-{calibrated['token_range'][1]} of "
                         f"this text; scoring {windows} windows of {window} tokens would reach into them. "
                         "Pass fewer --windows, a smaller --window, or another --text")
    return scored + f" (calibration used windows {calibrated['first_window']}-" \
                    f"{calibrated['first_window'] + calibrated['windows'] - 1}: disjoint)"


def cmd_eval(args) -> None:
    from .eval import Reference, evaluate, model_size, perplexity, token_ids
    from .io import load, load_model
    from .io.api import recover_folder
    from .io.hf_quantized import quant_method
    from .io.lowbit_format import read_meta
    from .io.models import load_tokenizer

    path = Path(args.model)
    recover_folder(path)  # a save interrupted between its renames left the folder aside
    if (path / "lowbit.json").is_file():
        meta = read_meta(path)
        model, tok = load(path), load_tokenizer(path)
        source, calibrated = args.reference or meta.get("source"), meta.get("calibration_text")
    elif path.is_dir() and quant_method(path):  # GPTQ / AWQ / compressed-tensors of other tools: lowbit's reader
        print(f"reading {path} ({quant_method(path)}) with lowbit.load")
        model, tok = load(path), load_tokenizer(path)
        source, calibrated = args.reference, None
    else:
        model, tok = load_model(args.model)
        source, calibrated = args.reference, None
    text = _text(args.text)
    print("scoring " + check_disjoint(calibrated, text, args.window, args.windows))
    ids = token_ids(tok, text)
    size = model_size(model)
    print(f"size {size.bytes / 1e6:.1f} MB, {size.bits_per_weight:.2f} bits/weight overall")
    if source:
        ref_model, _ = load_model(source)
        ref = Reference.capture(ref_model, ids, window=args.window, max_windows=args.windows)
        del ref_model
        r = evaluate(model, ref)
        print(f"ppl {r.ppl:.3f} (full precision {r.ref_ppl:.3f}, {r.delta_ppl_pct:+.2f}%), KL {r.kl:.4f}, "
              f"top-1 agreement {r.top1_agreement:.3f} over {r.tokens} tokens")
    else:
        p = perplexity(model, ids, window=args.window, max_windows=args.windows)
        print(f"ppl {p.ppl:.3f} over {p.tokens} tokens (no full-precision reference: pass --reference)")


def cmd_compare(args) -> None:
    from tqdm import tqdm

    from .analysis import compare_recipes, parse_specs
    from .analysis.compare import format_row, is_encoder, table_footer, table_head
    from .io import load_model
    from .pipeline import get_recipe

    specs = parse_specs(args.recipes)
    for name, method in specs:  # a bad name fails before the model loads
        get_recipe(name, method)
    model, tok = load_model(args.model)
    tqdm.write(table_head("cosine" if is_encoder(model) else "ppl"), file=sys.stdout)  # each row as it is done, above the progress bars
    cmp = compare_recipes(model, tok, _text(args.text), specs, window=args.window, windows=args.windows,
                          calibration_windows=args.calibration_windows, speed=not args.no_speed,
                          on_row=lambda r: tqdm.write(format_row(r), file=sys.stdout))
    print(table_footer(cmp))
    if args.out:
        from .cli_analysis import save_compare
        save_compare(args, model, cmp)


# w4g64 twice: round to nearest, and `auto` (AWQ scales then GPTQ), what `lowbit quantize` does by default
MAIN_RECIPES = "w8,w8a8-dynamic,fp8,nf4,w4g64:rtn,w4g64:auto,w4g64:hqq,mxfp4,nvfp4"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lowbit", description="Neural-network quantization toolkit.")
    sub = p.add_subparsers(dest="command", required=True)
    pf = sub.add_parser("formats", help="list number formats, or show how a value is stored in one")
    pf.add_argument("name", nargs="?", help="a format name, e.g. fp8_e4m3")
    pf.add_argument("--value", type=float, action="append", help="a value to round (repeatable)")
    from .cli_analysis import add_compare_out, add_formats_plot, register
    add_formats_plot(pf)

    def common(sp, calibration_windows=32):
        sp.add_argument("--text", help="a UTF-8 text file (default: Python's own documentation text)")
        sp.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
        sp.add_argument("--calibration-windows", type=int, default=calibration_windows,
                        help="calibration windows for static activations and gptq/awq/smoothquant "
                             f"(default {calibration_windows})")

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
    common(pq)
    pe = sub.add_parser("eval", help="perplexity, KL and top-1 agreement of a (quantized) model")
    pe.add_argument("model", help="a folder written by `lowbit quantize`, a GPTQ / AWQ / compressed-tensors "
                    "folder of another tool (read with lowbit.load), or a model as for quantize")
    pe.add_argument("--reference", help="full-precision model to compare with (default: the saved source)")
    pe.add_argument("--windows", type=int, default=16, help="evaluation windows (default 16)")
    common(pe)
    pc = sub.add_parser("compare", help="quantize with several recipes and print one comparison table")
    pc.add_argument("model", nargs="?", default="smollm2-135m")
    pc.add_argument("--recipes", default=MAIN_RECIPES,
                    help=f"comma list, recipe[:method]; without a method, the recipe's own (round to nearest); "
                         f":auto as lowbit quantize picks (default {MAIN_RECIPES})")
    pc.add_argument("--windows", type=int, default=8,
                    help="evaluation windows, from the text's start (default 8)")
    pc.add_argument("--no-speed", action="store_true", help="skip the decode speed measurement")
    common(pc, calibration_windows=8)  # read after the evaluated windows; 8 keep the main job short
    add_compare_out(pc)
    handlers = register(sub)
    args = p.parse_args(argv)
    try:
        if args.command == "formats":
            cmd_formats(args)
        else:
            {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare, **handlers}[args.command](args)
    except ValueError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # saves are atomic: an interrupted run leaves nothing behind
        print("lowbit: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def cmd_formats(args) -> None:
    if args.plot:
        from .cli_analysis import formats_plot
        return formats_plot(args)
    if args.name is None:
        print(formats_table())
    elif not args.value:
        f = formats.get(args.name)
        print(f"{f.name}: {f.kind}, {f.bits} bits, max {_fmt_num(f.max)}, epsilon {_fmt_num(f.eps)}")
        if f.bits <= 6:
            print("values:", ", ".join(_fmt_num(float(v)) for v in f.values))
    else:
        print("\n".join(explain_value(args.name, v) for v in args.value))


if __name__ == "__main__":
    sys.exit(main())
