"""Every GGUF recipe, byte for byte against llama-quantize, on a Llama whose rows are multiples of 256.

SmolLM2's 576-wide rows make llama.cpp fall back from K types to 32-value blocks for all but ffn_down
(docs/gguf.md), so most K-mixture rules and the Q2_K/Q3_K blocks never show on it. This writes a small
random Llama (hidden 512, intermediate 1536, 8 layers, 8 heads, 4 kv heads; SmolLM2's vocabulary so
its tokenizer fits) as F32 with lowbit, then for each recipe compares lowbit's file with
`llama-quantize F32 TYPE` (no imatrix) tensor by tensor: type and bytes.

    python bench/gguf_mixtures_check.py                  # every recipe
    python bench/gguf_mixtures_check.py --recipes q2_k,q3_k_m
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf_check import FTYPE_NAMES, bins, run, same_tensors  # noqa: E402

from lowbit.io import load, save  # noqa: E402


def random_llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=False,
                         max_position_embeddings=2048)
    return tf.LlamaForCausalLM(cfg).eval()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default=",".join(r for r in FTYPE_NAMES if r not in ("f32",)))
    ap.add_argument("--work", default="/tmp/lowbit-gguf-mixtures")
    args = ap.parse_args()
    b, work = bins(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    f32 = save(random_llama(), work / "llama-f32.gguf", recipe="f32", source="smollm2-135m")
    bad_total = 0
    print("| recipe | tensors | differing (type or bytes) |")
    print("|---|---|---|")
    for recipe in args.recipes.split(","):
        ours = save(load(f32), work / f"lowbit-{recipe}.gguf", recipe=recipe, source="smollm2-135m")
        ref = work / f"llama-{recipe}.gguf"
        run([b / "llama-quantize", f32, ref, FTYPE_NAMES[recipe], 2])
        bad = same_tensors(ours, ref)
        bad_total += len(bad)
        from lowbit.io.gguf.file import parse_gguf
        n = len(parse_gguf(ours).tensors)
        print(f"| {recipe} | {n} | {len(bad)}{': ' + ', '.join(bad[:4]) if bad else ''} |", flush=True)
    return 1 if bad_total else 0


if __name__ == "__main__":
    sys.exit(main())
