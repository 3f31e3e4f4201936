"""What the int8 activations of the kernels cost in perplexity (kernels/qmatmul.py, LOWBIT_ACTIVATIONS).

SmolLM2-135M quantized with each recipe (RTN), then perplexity on the first --windows windows of 512
tokens of wikitext-2 test (each window one prefill, so the prefill route decides): fp32 activations
(exact), bf16 activations on the dequantize route (activations="float"), and bf16 activations on the
int8 GEMM (activations="int8": for these prefills what "auto", the default, does in bf16).

    PYTHONPATH=. .venv/bin/python bench/activation_rounding.py --windows 8 --threads 2
"""
from __future__ import annotations

import argparse
import copy

import torch

import lowbit
from lowbit.eval.perplexity import perplexity
from lowbit.io import load_model
from lowbit.kernels import qmatmul


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", default="w4g64,w8,w4g64-sym")
    ap.add_argument("--text", default="../shared/data/wikitext-2/test.txt")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model("smollm2-135m")
    text = open(a.text, encoding="utf-8").read()

    def ppl(m, mode="auto"):
        with torch.inference_mode(), qmatmul.activations(mode):
            return perplexity(m, tok, text, max_windows=a.windows, progress=False).ppl

    print(f"fp32 model: {ppl(model):.4f}")
    print("| recipe | fp32 act, exact | bf16 act, dequantize route | bf16 act, int8 GEMM | int8 vs dequantize |")
    print("|---|---:|---:|---:|---:|")
    for recipe in a.recipes.split(","):
        q = lowbit.quantize(copy.deepcopy(model), recipe, progress=False)
        exact = ppl(q)
        q = q.to(torch.bfloat16)
        dequant, int8 = ppl(q, "float"), ppl(q, "int8")
        print(f"| {recipe} | {exact:.3f} | {dequant:.3f} | {int8:.3f} | {(int8 / dequant - 1) * 100:+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
