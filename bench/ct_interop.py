"""compressed-tensors export of SmolLM2-135M, read back by transformers (the engine people use) and by
lowbit.load: per recipe, how it loads and how far its logits are from lowbit's own quantized model.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python bench/ct_interop.py [--tokens 512] [--recipes fp8-dynamic,...]

Round to nearest (the codes do not depend on the method); logits over the first --tokens tokens of
wikitext-2 test (tests/data excerpt). Prints one markdown table.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

RECIPES = ("w4g64-sym", "w4g64-int-zero", "w8", "fp8", "w8a8-dynamic", "fp8-dynamic", "nvfp4",
           "w4g64-sym+w8-down")


def recipe(name: str):
    from lowbit.core import Scheme
    from lowbit.core.granularity import PerGroup
    from lowbit.pipeline import Override, Recipe, get_recipe

    if name == "w4g64-sym+w8-down":  # two config groups: int4 groups of 64, int8 per channel for down_proj
        return get_recipe("w4g64-sym", "rtn").replace(
            overrides=(Override("*down_proj", weights=get_recipe("w8").weights),), name=name)
    if name == "w4g64-int-zero":  # affine with integer zero points: GPTQ/AWQ's convention
        return Recipe(Scheme("uint4", PerGroup(64), symmetric=False, range="minmax", scale_format="fp16",
                             integer_zero=True), name=name)
    return get_recipe(name, "rtn")


def main() -> None:
    import transformers as tf

    import lowbit
    from lowbit.io import load_model
    from lowbit.pipeline import quantize

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma list (default: all)")
    args = p.parse_args()
    base, tok = load_model("smollm2-135m")
    text = (Path(__file__).resolve().parents[1] / "tests/data/wikitext-2/test-excerpt.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    rows = []
    for name in args.recipes.split(","):
        model = quantize(copy.deepcopy(base), recipe(name), progress=False)
        with torch.no_grad():
            ref = model(ids).logits
        with tempfile.TemporaryDirectory() as d:
            out = lowbit.save(model, Path(d) / "ct", format="compressed-tensors", tokenizer=tok)
            mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
            how = "default"
            try:
                hf = tf.AutoModelForCausalLM.from_pretrained(out)
                with torch.no_grad():
                    got = hf(ids).logits
            except (RuntimeError, ValueError):
                how = "dequantize=True"
                hf = tf.AutoModelForCausalLM.from_pretrained(
                    out, quantization_config=tf.CompressedTensorsConfig(dequantize=True))
                with torch.no_grad():
                    got = hf(ids).logits
            t = time.perf_counter()
            back = lowbit.load(out)
            load_s = time.perf_counter() - t
            with torch.no_grad():
                ours = back(ids).logits
        d_hf = (got.float() - ref).abs().max().item()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        d_lb = (ours - ref).abs().max().item()
        rows.append((name, mb, how, d_hf, d_hf / ref.abs().max().item(), agree, d_lb, load_s))
        print(rows[-1], flush=True)
    print(f"\n{ids.shape[1]} tokens; |ref logit| max {ref.abs().max().item():.1f}\n")
    print("| recipe | folder MB | transformers loads with | max abs logit diff | relative | top-1 agreement "
          "| lowbit.load max diff | lowbit.load s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]} | {r[3]:.3g} | {r[4]:.2g} | {r[5]:.4f} | {r[6]:.3g} | {r[7]:.1f} |")


if __name__ == "__main__":
    main()
