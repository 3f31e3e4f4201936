"""The main job: quantize one model with several recipes and compare each with full precision.

For causal LMs: perplexity, its change, KL(fp || quantized) and top-1 agreement on the
evaluation windows, size and decode speed. For encoders (no output layer, e.g. MiniLM): the
fidelity of mean-pooled sentence embeddings (lowbit.eval.embedding_fidelity: mean and least
cosine, Spearman of the pairwise similarities) on sentences from the text's first half;
calibrated recipes read the windows at the text's end. The full-precision model runs once (its
predictions are kept in a Reference); each recipe quantizes a fresh copy of the model.
Recipes that calibrate (static activations, gptq/awq/smoothquant, `:auto` for low-bit
weights) read the windows that follow the evaluated ones, never an evaluated token.

    cmp = compare_recipes(model, tok, text, ["w8", "w4g64:rtn", "w4g64:auto"])
    print(format_table(cmp))
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..eval import (Reference, embedding_fidelity, evaluate, generation_speed, linear_bits_per_weight, model_size,
                    sentences_from_text, token_ids)
from ..eval.size import BITS_LAYERS, BITS_MODEL
from ..methods import method_needs
from ..pipeline import Recipe, get_recipe, quantize


@dataclass(frozen=True)
class CompareRow:
    recipe: str  # as asked: "w4g64:auto"
    method: str  # the chain that ran: "awq+gptq"
    embeddings: str  # how the embedding table / output layer are stored: "int8/ch", "fp32"
    bits_per_weight_layers: float  # BITS_LAYERS: over the quantized layers of the blocks
    bits_per_weight_model: float   # BITS_MODEL: over the whole model
    size_mb: float  # whole model, embeddings included
    ppl: float
    delta_ppl_pct: float
    kl: float
    top1: float
    decode_tok_s: float
    quantize_s: float
    calibrated: bool
    cosine: float | None = None      # encoders: mean cosine of sentence embeddings against fp32
    cosine_min: float | None = None  # the least of them
    spearman: float | None = None    # rank correlation of the pairwise similarities with fp32's


@dataclass(frozen=True)
class Comparison:
    rows: list[CompareRow]
    window: int
    windows: int  # evaluated: windows 0 .. windows-1
    calibration_windows: int  # read by calibrated rows: the windows right after the evaluated ones
    text_tokens: int
    decode_tokens: int  # timed greedy decode steps per row (0: not measured)
    metric: str = "ppl"  # "ppl" (causal LM: ppl, KL, top-1) or "cosine" (encoder: sentence embeddings)
    sentences: int = 0   # encoders: the sentences compared (from the first half of the text)


def parse_specs(specs: "str | list") -> list[tuple[str, str | None]]:
    """"w8,w4g64:auto" -> [("w8", None), ("w4g64", "auto")] (a list of such pairs passes through)."""
    if isinstance(specs, str):
        specs = [s.strip() for s in specs.split(",") if s.strip()]
    out = []
    for s in specs:
        if isinstance(s, str):
            name, _, method = s.partition(":")
            s = (name, method or None)
        out.append(s)
    if not out:
        raise ValueError("recipes: give at least one recipe, e.g. w8,w4g64:auto")
    return out


def _spec(name: str, method: str | None) -> str:
    return f"{name}:{method}" if method else name


def _calibrates(recipe: Recipe) -> bool:
    return bool(recipe.observer) or bool(method_needs(recipe.method))


def compare_recipes(model, tokenizer, text: str, recipes: "str | list", *, window: int = 512,
                    windows: int = 8, calibration_windows: int = 8, batch_size: int = 4, speed: bool = True,
                    decode_tokens: int = 16, progress: bool = True,
                    on_row: "Callable[[CompareRow], None] | None" = None) -> Comparison:
    """Full precision, then each recipe (a "name[:method]" spec or a (name, method) pair), on `text`.

    Windows 0..windows-1 of `text` are evaluated, `batch_size` at a time; calibrated recipes read
    windows windows..windows+calibration_windows-1. Decode speed: `decode_tokens` greedy steps
    after a 32-token prompt and a 2-step warm-up (0 or speed=False: not measured).
    on_row(row) is called as each row is done (the CLI prints it then).
    """
    specs = parse_specs(recipes)
    resolved = [get_recipe(name, method) for name, method in specs]  # bad names fail before any work
    if is_encoder(model):
        return _compare_encoder(model, tokenizer, text, specs, resolved, window, windows, calibration_windows,
                                progress, on_row)
    ids = token_ids(tokenizer, text)
    calibrated = any(_calibrates(r) for r in resolved)
    need = (windows + (calibration_windows if calibrated else 0)) * window
    if len(ids) < need:
        raise ValueError(f"the text has {len(ids)} tokens; {windows} evaluated windows of {window}"
                         + (f" + {calibration_windows} calibration windows" if calibrated else "")
                         + f" need {need}: give a longer text or fewer windows")
    decode_tokens = decode_tokens if speed else 0
    bar = tqdm(total=len(specs) + 1, desc="compare", unit="model", disable=not progress, position=0)

    def step(label: str) -> None:
        bar.set_description(f"compare [{label}]")
        bar.refresh()

    step("fp32 reference")
    ref = Reference.capture(model, ids[: windows * window], window=window, max_windows=windows,
                            batch_size=batch_size, progress=progress)
    calib = [ids[(windows + i) * window:(windows + i + 1) * window][None] for i in range(calibration_windows)]
    rows = []

    def done(row: CompareRow) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)
        bar.update()

    done(_row("fp32", "-", model, evaluate(model, ref, batch_size=batch_size, progress=progress), tokenizer,
              decode_tokens, 0.0, False, progress))
    for (name, method), recipe in zip(specs, resolved):
        spec = _spec(name, method)
        step(f"{spec}: {recipe.method}")
        q = copy.deepcopy(model)
        t = time.perf_counter()
        quantize(q, recipe, calibration=calib if _calibrates(recipe) else None, progress=progress)
        took = time.perf_counter() - t
        done(_row(spec, recipe.method, q, evaluate(q, ref, batch_size=batch_size, progress=progress),
                  tokenizer, decode_tokens, took, _calibrates(recipe), progress))
        del q
    bar.close()
    return Comparison(rows, window, windows, calibration_windows if calibrated else 0, len(ids), decode_tokens)


def is_encoder(model) -> bool:
    """A model without an output layer that is not a decoder: scored by its sentence embeddings."""
    return model.get_output_embeddings() is None and not getattr(model.config, "is_decoder", False)


def _compare_encoder(model, tokenizer, text, specs, resolved, window, windows, calibration_windows, progress,
                     on_row) -> Comparison:
    """compare_recipes for an encoder: windows * 8 sentences of the text's first half, scored by
    embedding fidelity against `model`; calibration windows from the end of the text."""
    sents = sentences_from_text(text[: len(text) // 2], windows * 8)
    ids = token_ids(tokenizer, text)
    calibrated = any(_calibrates(r) for r in resolved)
    calib = [ids[len(ids) - (i + 1) * window: len(ids) - i * window][None] for i in reversed(range(calibration_windows))]
    if calibrated and len(ids) < 2 * calibration_windows * window:
        raise ValueError(f"the text has {len(ids)} tokens; {calibration_windows} calibration windows of {window} "
                         "from its second half need more: give a longer text or fewer windows")
    rows = []
    for (name, method), recipe in [(("fp32", None), None), *zip(specs, resolved)]:
        q, took = model, 0.0
        if recipe is not None:
            q = copy.deepcopy(model)
            t = time.perf_counter()
            quantize(q, recipe, calibration=calib if _calibrates(recipe) else None, progress=progress)
            took = time.perf_counter() - t
        f = embedding_fidelity(q, model, tokenizer, sents)
        nan = float("nan")
        size = model_size(q)
        row = CompareRow(_spec(name, method), recipe.method if recipe else "-", _embedding_label(q),
                         linear_bits_per_weight(q), size.bits_per_weight, size.bytes / 1e6, nan, nan, nan, nan, nan,
                         took, bool(recipe and _calibrates(recipe)), f.cosine, f.cosine_min, f.spearman)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return Comparison(rows, window, 0, calibration_windows if calibrated else 0, len(ids), 0, "cosine", len(sents))


def _row(name, method, model, report, tokenizer, decode_tokens, took, calibrated, progress) -> CompareRow:
    tok_s = float("nan")
    if decode_tokens:
        tok_s = generation_speed(model, tokenizer, prompt_tokens=32, new_tokens=decode_tokens, runs=1,
                                 warmup_tokens=2, progress=progress).decode_tokens_per_s
    size = model_size(model)
    return CompareRow(name, method, _embedding_label(model), linear_bits_per_weight(model), size.bits_per_weight,
                      size.bytes / 1e6, report.ppl, report.delta_ppl_pct, report.kl,
                      report.top1_agreement, tok_s, took, calibrated)


def _embedding_label(model) -> str:
    """How the input embedding table and the output layer are stored, e.g. "int8/ch" or "fp32"."""
    def label(m):
        q = getattr(m, "qweight", None)
        if q is None:
            w = getattr(m, "weight", None)
            return str(w.dtype).removeprefix("torch.").replace("float", "fp") if isinstance(w, torch.Tensor) else "-"
        s, g = q.scheme, q.scheme.granularity
        kind = {"PerChannel": "ch", "PerTensor": "t", "PerToken": "tok"}.get(type(g).__name__)
        return s.name or f"{s.format}/{kind or 'g' + str(getattr(g, 'size', '?'))}"

    parts = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        m = getattr(model, get, lambda: None)()
        if m is not None and label(m) not in parts:
            parts.append(label(m))
    return "+".join(parts) or "-"


_BITS = f"{BITS_LAYERS.short:>13} {BITS_MODEL.short:>12}"


def _bits(r: CompareRow) -> str:
    return f"{r.bits_per_weight_layers:>13.2f} {r.bits_per_weight_model:>12.2f}"


def table_head(metric: str = "ppl") -> str:
    if metric == "cosine":
        head = (f"{'recipe':<14} {'method':<11} {'emb/out':<8} {_BITS} {'size MB':>8} {'cosine':>8} "
                f"{'min cos':>8} {'Spearman':>8} {'quant s':>7}")
        return head + "\n" + "-" * len(head)
    head = (f"{'recipe':<14} {'method':<11} {'emb/out':<8} {_BITS} {'size MB':>8} {'ppl':>8} {'Δppl':>8} "
            f"{'KL':>7} {'top-1':>6} {'tok/s':>6} {'quant s':>7}")
    return head + "\n" + "-" * len(head)


def format_row(r: CompareRow) -> str:
    if r.cosine is not None:
        return (f"{r.recipe:<14} {r.method:<11} {r.embeddings:<8} {_bits(r)} {r.size_mb:>8.1f} "
                f"{r.cosine:>8.5f} {r.cosine_min:>8.4f} {r.spearman:>8.4f} {r.quantize_s:>7.1f}")
    return (f"{r.recipe:<14} {r.method:<11} {r.embeddings:<8} {_bits(r)} {r.size_mb:>8.1f} "
            f"{r.ppl:>8.3f} {r.delta_ppl_pct:>+7.2f}% {r.kl:>7.4f} {r.top1:>6.3f} {r.decode_tok_s:>6.1f} "
            f"{r.quantize_s:>7.1f}")


def format_table(cmp: Comparison) -> str:
    """The table, then what was evaluated, what calibrated on which windows, and how speed was timed."""
    return "\n".join([table_head(cmp.metric), *map(format_row, cmp.rows), table_footer(cmp)])


def bits_legend() -> str:
    """The two bits-per-weight columns in words (compare's and memory's tables end with it)."""
    return f"{BITS_LAYERS.label}: {BITS_LAYERS.means}; {BITS_MODEL.label}: {BITS_MODEL.means}."


def table_footer(cmp: Comparison) -> str:
    """What was evaluated, which windows calibrated which rows, how speed was timed."""
    lines = []
    w, n = cmp.window, cmp.windows
    if cmp.metric == "cosine":
        lines.append(f"evaluated: {cmp.sentences} sentences of the text's first half, mean-pooled embeddings against "
                     "fp32 (cosine: mean and least; Spearman: the pairwise similarities' ranks).")
        cal = [r.recipe for r in cmp.rows if r.calibrated]
        if cal:
            lines.append(f"calibration ({', '.join(cal)}): the last {cmp.calibration_windows} windows of {w} tokens.")
        return "\n".join([*lines, bits_legend()])
    lines.append(f"evaluated: windows 0-{n - 1} of {w} tokens (tokens 0-{n * w - 1} of {cmp.text_tokens}).")
    cal = [r.recipe for r in cmp.rows if r.calibrated]
    if cal:
        c = cmp.calibration_windows
        lines.append(f"calibration ({', '.join(cal)}): windows {n}-{n + c - 1} (tokens {n * w}-{(n + c) * w - 1}), "
                     f"{c} windows, none of them evaluated.")
    lines.append(bits_legend())
    lines.append("size: the whole model; emb/out: the embedding table and output layer (one tensor when tied).")
    lines.append(f"tok/s: {cmp.decode_tokens} greedy decode steps after a 32-token prompt and a 2-step warm-up, "
                 "batch 1." if cmp.decode_tokens else "tok/s: not measured.")
    return "\n".join(lines)
