"""The mixed-precision search's sensitivity pass against one calibrated quantization (issue 25), SmolLM2-135M.

In one process, on the same N windows of 512 tokens of wikitext-2 valid.txt (tokens 5120 on,
after the windows bench/mixed_precision.py scores and calibrates on):

  1. the baseline: lowbit.quantize(model, w4g64, method auto) calibrated on the N windows
  2. layer_sensitivity(score="fisher"): default candidates, RTN weights, scored on the N windows
  3. with --calibrated: layer_sensitivity(score="fisher", method awq+gptq, candidates
     w3g64,w4g64-sym,w4g64,w5g64), fitted on the N windows, scored on the 4 windows of 256 before them
  4. with --full K: layer_sensitivity(score="full", measure="all") on the first K windows cut to
     --full-window tokens, over the layers of --full-blocks; Spearman rho per candidate of the
     Fisher score (on the same K windows) against it; the full costs cached in --out.

    flock /tmp/lowbit-bench.lock nice -n 5 env PYTHONPATH=. .venv/bin/python -P bench/search_scaling.py --threads 2 \
        --calibrated --repeat 2
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from lowbit.analysis.sensitivity import (
    DEFAULT_CANDIDATES,
    Sensitivity,
    layer_sensitivity,
)
from lowbit.eval import token_ids
from lowbit.io import load_model, models, wikitext2
from lowbit.pipeline import Recipe, get_recipe, quantize
from lowbit.pipeline.recipe import _affine

# w5g64 is not a named recipe: uint5 affine groups of 64 with fp16 scales and zeros (bench/mixed_precision.py's)
CALIBRATED = ["w3g64", "w4g64-sym", "w4g64", Recipe(_affine("uint5", 64), name="w5g64")]


def _rho(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def _keep_fastest(rows: dict, key: str, seconds: float) -> None:
    rows[key] = min(rows.get(key, seconds), seconds)
    rows.setdefault(key + "_runs", []).append(round(seconds, 1))


def _timed_passes(args, model, windows, valid, out: Path, rows: dict) -> None:
    if not args.skip_baseline:
        q = copy.deepcopy(model)
        t = time.perf_counter()
        quantize(q, get_recipe("w4g64"), method="auto", calibration=[w[None] for w in windows], progress=True)
        _keep_fastest(rows, "auto_w4g64_s", time.perf_counter() - t)
        del q
        print(f"calibrated auto w4g64 on {args.windows} windows of 512: {rows['auto_w4g64_s_runs'][-1]} s", flush=True)
    fisher = layer_sensitivity(model, windows, DEFAULT_CANDIDATES)
    _keep_fastest(rows, "fisher_rtn_s", fisher.seconds)
    (out / "fisher_rtn.json").write_text(json.dumps(fisher.to_dict()))
    print(f"fisher sensitivity (rtn, {len(DEFAULT_CANDIDATES)} candidates): {fisher.seconds:.1f} s", flush=True)
    if args.calibrated:
        scored = [valid[5120 - (4 - i) * 256:5120 - (3 - i) * 256] for i in range(4)]
        cal = layer_sensitivity(model, scored, CALIBRATED, method="awq+gptq",
                                solver_calibration=[w[None] for w in windows])
        _keep_fastest(rows, "fisher_awq_gptq_s", cal.seconds)
        (out / "fisher_awq_gptq.json").write_text(json.dumps(cal.to_dict()))
        print(f"fisher sensitivity (awq+gptq, {len(CALIBRATED)} candidates): {cal.seconds:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out/search_scaling")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="time the baseline and the Fisher passes this many times, "
                    "alternating, and keep the fastest of each (a shared machine's noise only slows runs down)")
    ap.add_argument("--only-full", action="store_true", help="only the ranking against the full measurement")
    ap.add_argument("--calibrated", action="store_true", help="also time the awq+gptq-priced Fisher pass")
    ap.add_argument("--full", type=int, default=0, help="windows for the full measurement (0: none)")
    ap.add_argument("--full-window", type=int, default=256)
    ap.add_argument("--full-blocks", default="all", help="comma list of block indices, or all")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if not models.WIKITEXT2.is_dir():
        models.WIKITEXT2 = Path("/work/shared/data/wikitext-2")
    model, tok = load_model("smollm2-135m")
    valid = token_ids(tok, wikitext2("valid"))
    windows = [valid[5120 + i * 512:5120 + (i + 1) * 512] for i in range(args.windows)]
    rows = {"windows": args.windows, "window": 512, "threads": args.threads}
    for _ in range(args.repeat if not args.only_full else 0):
        _timed_passes(args, model, windows, valid, out, rows)
    if args.full:
        short = [w[:args.full_window] for w in windows[:args.full]]
        names = None
        if args.full_blocks != "all":
            blocks = {int(b) for b in args.full_blocks.split(",")}
            names = [n for n, m in model.named_modules() if n.startswith("model.layers.") and
                     isinstance(m, torch.nn.Linear) and int(n.split(".")[2]) in blocks]
        cache = out / f"full_{args.full}x{args.full_window}_{args.full_blocks}.json"
        if cache.is_file():
            full = Sensitivity.from_dict(json.loads(cache.read_text()))
        else:
            full = layer_sensitivity(model, short, DEFAULT_CANDIDATES, score="full", measure="all", names=names)
            cache.write_text(json.dumps(full.to_dict()))
        cheap = layer_sensitivity(model, short, DEFAULT_CANDIDATES, names=names)
        rows["full_s"], rows["full_runs"], rows["fisher_same_windows_s"] = full.seconds, full.runs, cheap.seconds
        rows["rho"] = {c: _rho(cheap.fisher[:, i], full.kl[:, i]) for i, c in enumerate(full.candidates)}
        rows["rho_output_err"] = {c: _rho(full.output_err[:, i], full.kl[:, i]) for i, c in enumerate(full.candidates)}
        rows["rho_all_pairs"] = _rho(cheap.fisher.flatten(), full.kl.flatten())
        rows["median_fisher_over_kl"] = {c: float((cheap.fisher[:, i] / full.kl[:, i]).median())
                                         for i, c in enumerate(full.candidates)}
    print(json.dumps(rows), flush=True)
    with (out / "rows.jsonl").open("a") as f:
        f.write(json.dumps(rows) + "\n")


if __name__ == "__main__":
    main()
