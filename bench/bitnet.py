"""Post-training collapse of SmolLM2-135M under extreme low-bit weights: binary, ternary, BitNet b1.58.

Every Linear of the decoder blocks is quantized from the fp32 model with no calibration and no
training (embeddings and the output layer stay fp32, as in BitNet): `binary` (XNOR-Net: sign(W)
times mean |W| per output channel, 1 bit), `ternary` ({-1, 0, 1} times mean |W| per channel,
2-bit codes), `bitnet` (BitNet b1.58: per-tensor absmean ternary weights, int8 activations per
token, nn.BitLinear), with `w2g64` (2-bit affine groups of 64, round to nearest) and `w4g64` as
references. Perplexity over the first `--windows` windows of 512 tokens of wikitext-2 test (the
reference protocol's opening windows), fp32 measured in the same run; bits per weight of the
quantized Linear layers counted from their stored bytes.

    PYTHONPATH=. .venv/bin/python bench/bitnet.py --windows 8 [--text /work/shared/data/wikitext-2/test.txt]
"""
from __future__ import annotations

import argparse
import copy

import torch

import lowbit
from lowbit.eval.perplexity import perplexity, token_ids
from lowbit.io import load_model
from lowbit.io.models import wikitext2
from lowbit.nn import QuantLinear

RECIPES = ("binary", "ternary", "bitnet", "w2g64", "w4g64")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text", default=None, help="wikitext-2 test.txt (default: ../shared beside the repo)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    text = open(args.text, encoding="utf-8").read() if args.text else wikitext2("test")
    ids = token_ids(tok, text)
    base = perplexity(model, ids, max_windows=args.windows, progress=False).ppl
    print(f"SmolLM2-135M, {args.windows} x 512 tokens of wikitext-2 test, {args.threads} threads")
    print("| recipe | bits/weight (Linear) | ppl | x fp32 |\n|---|---|---|---|")
    print(f"| fp32 | 32 | {base:.2f} | 1.00 |", flush=True)
    for name in RECIPES:
        q = copy.deepcopy(model)
        lowbit.quantize(q, name, progress=False)
        layers = [m for m in q.model.layers.modules() if isinstance(m, QuantLinear)]
        bpw = 8 * sum(m.qweight.nbytes for m in layers) / sum(m.qweight.numel for m in layers)
        ppl = perplexity(q, ids, max_windows=args.windows, progress=False).ppl
        print(f"| {name} | {bpw:.3f} | {ppl:,.1f} | {ppl / base:,.1f} |", flush=True)
        del q


if __name__ == "__main__":
    main()
