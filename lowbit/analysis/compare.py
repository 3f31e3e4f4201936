"""The main job: quantize one model with several recipes and compare each with full precision.

For causal LMs: perplexity, its change, KL(fp || quantized) and top-1 agreement
on the evaluation text, size and decode speed. The full-precision model runs
once (its predictions are kept in a Reference); each recipe quantizes a fresh
copy of the model.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from ..eval import Reference, evaluate, generation_speed, model_size, token_ids
from ..pipeline import get_recipe, quantize


@dataclass(frozen=True)
class CompareRow:
    recipe: str
    method: str
    bits_per_weight: float  # over the quantized Linear layers
    size_mb: float  # whole model, embeddings included
    ppl: float
    delta_ppl_pct: float
    kl: float
    top1: float
    decode_tok_s: float
    quantize_s: float


def compare_recipes(model, tokenizer, text: str, recipes: list[tuple[str, str | None]], *, window: int = 512,
                    windows: int = 16, calibration_windows: int = 8, speed: bool = True,
                    progress: bool = True) -> list[CompareRow]:
    """Rows for full precision then each (recipe name, method or None) on `text`.

    The first `windows` windows of `text` are evaluated; static-activation recipes calibrate
    on the `calibration_windows` windows that follow them, never on evaluated tokens.
    """
    ids = token_ids(tokenizer, text)
    need = (windows + calibration_windows) * window
    if len(ids) < need:
        raise ValueError(f"the text has {len(ids)} tokens; {windows} + {calibration_windows} windows of {window} "
                         f"need {need}: give a longer text or fewer windows")
    ref = Reference.capture(model, ids[: windows * window], window=window, max_windows=windows, progress=progress)
    calib = [ids[(windows + i) * window:(windows + i + 1) * window][None] for i in range(calibration_windows)]
    rows = [_row("fp32", "-", model, evaluate(model, ref, progress=progress), tokenizer, speed, 0.0)]
    for name, method in recipes:
        recipe = get_recipe(name, method)
        q = copy.deepcopy(model)
        t = time.perf_counter()
        quantize(q, recipe, calibration=calib, progress=progress)
        took = time.perf_counter() - t
        rows.append(_row(name, recipe.method, q, evaluate(q, ref, progress=progress), tokenizer, speed, took))
        del q
    return rows


def _row(name, method, model, report, tokenizer, speed, took) -> CompareRow:
    size = model_size(model)
    linear_bpw = _linear_bits_per_weight(model)
    tok_s = generation_speed(model, tokenizer, prompt_tokens=64, new_tokens=16, runs=2).decode_tokens_per_s if speed else float("nan")
    return CompareRow(name, method, linear_bpw, size.bytes / 1e6, report.ppl, report.delta_ppl_pct, report.kl,
                      report.top1_agreement, tok_s, took)


def _linear_bits_per_weight(model) -> float:
    nbytes = numel = 0
    for m in model.modules():
        if hasattr(m, "quantized_nbytes"):
            nbytes += m.qweight.nbytes
            numel += m.qweight.numel
    if numel == 0:  # full precision: the Linear weights' own dtype
        ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        return 8.0 * ws[0].element_size() if ws else float("nan")
    return 8.0 * nbytes / numel


def format_table(rows: list[CompareRow]) -> str:
    head = (f"{'recipe':<14} {'method':<6} {'bits/w':>6} {'size MB':>8} {'ppl':>8} {'Δppl':>8} {'KL':>7} "
            f"{'top-1':>6} {'tok/s':>6} {'quant s':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.recipe:<14} {r.method:<6} {r.bits_per_weight:>6.2f} {r.size_mb:>8.1f} {r.ppl:>8.3f} "
                     f"{r.delta_ppl_pct:>+7.2f}% {r.kl:>7.4f} {r.top1:>6.3f} {r.decode_tok_s:>6.1f} {r.quantize_s:>7.1f}")
    return "\n".join(lines)
