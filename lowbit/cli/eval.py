"""`lowbit eval MODEL`: perplexity, KL and top-1 agreement of a (quantized) model against its source."""
from __future__ import annotations

from pathlib import Path

from .common import add_text_options, check_at_least, check_model, check_text_options, read_text, text_digest


def register(sub) -> dict:
    pe = sub.add_parser("eval", help="perplexity, KL and top-1 agreement of a (quantized) model")
    pe.add_argument("model", help="a folder written by `lowbit quantize`, a GPTQ / AWQ / compressed-tensors "
                    "folder of another tool (read with lowbit.load), or a model as for quantize")
    pe.add_argument("--reference", help="full-precision model to compare with (default: the saved source)")
    pe.add_argument("--windows", type=int, default=16, help="evaluation windows (default 16)")
    add_text_options(pe)
    return {"eval": cmd_eval}


def check_args(args) -> None:
    """Every argument of `lowbit eval`, before anything is loaded."""
    check_model(args.model)
    if args.reference is not None:
        check_model(args.reference, "--reference", source_model=True)
    check_at_least("--windows", args.windows)
    check_text_options(args)


def scored_windows(n_tokens: int, window: int, windows: int) -> int:
    """How many of the asked --windows the text holds (at least one, else refused)."""
    if n_tokens < window:
        raise ValueError(f"--window {window}: the text has {n_tokens} tokens, fewer than one window; give a smaller "
                         "--window or a longer --text")
    return min(windows, n_tokens // window)


def check_disjoint(calibrated: dict | None, text: str, window: int, windows: int, n_tokens: int | None = None) -> str:
    """Refuse to score windows a checkpoint was calibrated on; say which windows are scored (all the
    text holds when it holds fewer than `windows`)."""
    asked = windows
    windows = scored_windows(n_tokens, window, windows) if n_tokens is not None else windows
    scored = f"windows 0-{windows - 1} of {window} tokens" + (
        f" (the text holds {windows} of the {asked} asked)" if windows < asked else "")
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
    from ..analysis.memory import gguf_weights
    from ..eval import Reference, evaluate, linear_bits_per_weight, model_size, perplexity, token_ids
    from ..eval.size import BITS_LAYERS, BITS_MODEL
    from ..io import load, load_model
    from ..io.api import recover_folder
    from ..io.hf_quantized import quant_method
    from ..io.lowbit_format import read_meta
    from ..io.models import load_tokenizer

    path = Path(args.model)
    recover_folder(path)  # a save interrupted between its renames left the folder aside
    check_args(args)
    if (path / "lowbit.json").is_file():
        meta = read_meta(path)
        source, calibrated = args.reference or meta.get("source"), meta.get("calibration_text")
        if source and not args.reference:
            try:
                check_model(source, "its source")
            except ValueError as e:
                raise ValueError(f"{path / 'lowbit.json'} names {e}; pass --reference MODEL") from None
        model, tok = load(path), load_tokenizer(path)
    elif path.is_dir() and quant_method(path):  # GPTQ / AWQ / compressed-tensors of other tools: lowbit's reader
        print(f"reading {path} ({quant_method(path)}) with lowbit.load")
        model, tok = load(path), load_tokenizer(path)
        source, calibrated = args.reference, None
    else:
        model, tok = load_model(args.model)
        source, calibrated = args.reference, None
    text = read_text(args.text)
    ids = token_ids(tok, text)
    windows = scored_windows(len(ids), args.window, args.windows)
    print("scoring " + check_disjoint(calibrated, text, args.window, args.windows, len(ids)))
    if path.suffix == ".gguf":  # the file's own bytes; the model here is its dequantized float copy
        w = gguf_weights(path)
        print(f"file {w.weights_bytes / 1e6:.1f} MB of tensors, {BITS_LAYERS.label} {w.bits_per_weight_layers:.2f}, "
              f"{BITS_MODEL.label} {w.bits_per_weight_model:.2f} (from its tensor table; run here dequantized to "
              "fp32)")
    else:
        size = model_size(model)
        print(f"size {size.bytes / 1e6:.1f} MB, {BITS_LAYERS.label} {linear_bits_per_weight(model):.2f}, "
              f"{BITS_MODEL.label} {size.bits_per_weight:.2f}")
    if source:
        ref_model, _ = load_model(source)
        ref = Reference.capture(ref_model, ids, window=args.window, max_windows=windows)
        del ref_model
        r = evaluate(model, ref)
        print(f"ppl {r.ppl:.3f} (full precision {r.ref_ppl:.3f}, {r.delta_ppl_pct:+.2f}%), KL {r.kl:.4f}, "
              f"top-1 agreement {r.top1_agreement:.3f} over {r.tokens} tokens")
    else:
        p = perplexity(model, ids, window=args.window, max_windows=windows)
        why = "a .gguf file does not name its source" if path.suffix == ".gguf" else "none saved with the model"
        print(f"ppl {p.ppl:.3f} over {p.tokens} tokens. No full-precision reference ({why}): pass --reference "
              "MODEL for KL and top-1 agreement")
