"""Quantized KV cache on SmolLM2-135M: perplexity change, cache bytes per token, decode tokens/s.

Each window of `--window` tokens of wikitext-2 test (BOS + test.txt tokenized once, the first
`--windows` non-overlapping windows) is fed through one cache in chunks of `--chunk` tokens; each
chunk's logits are scored, so every chunk after the first attends to the earlier tokens of its
window as the cache holds them (quantized beyond the residual window). The full-precision
baseline (transformers' DynamicCache) is fed the same chunks in the same run. After the first
window the cache holds `--window` tokens: bytes per token are cache.nbytes() / tokens (codes,
scales, zero points and the full-precision residual window, every tensor counted; for lowbit also
the quantized part alone, the asymptote for long contexts), and decode
tokens/s is timed over `--decode` greedy one-token steps on that cache.

Settings: lowbit.kv_cache int8 / int4 / int2 / fp8 (keys per channel, values per token, groups
of 64, residual 128), and transformers' QuantizedCache with the same group and residual where its
backend runs on this machine: HQQ (8/4/2 bits, needs `pip install hqq`), quanto (4/2 bits,
`pip install optimum-quanto`), fp8 (per tensor, built in). A backend that fails is reported as such.

    PYTHONPATH=. .venv/bin/python bench/kv_cache.py --windows 3 --png docs/img/kv_cache.png \
        [--text /work/shared/data/wikitext-2/test.txt]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, QuantizedCache

import lowbit
from lowbit.eval.perplexity import token_ids, windows
from lowbit.io import load_model
from lowbit.io.models import wikitext2
from lowbit.nn import cache_keyword


def settings(config, group: int, residual: int) -> dict:
    """name -> a function making a fresh cache."""
    out = {"fp32 (DynamicCache)": lambda: DynamicCache(config=config)}
    for fmt in ("int8", "int4", "int2", "fp8"):
        out[f"lowbit {fmt}"] = lambda fmt=fmt: lowbit.kv_cache(fmt, group_size=group, residual_length=residual)
    for bits in (8, 4, 2):
        out[f"transformers hqq {bits}-bit"] = lambda bits=bits: QuantizedCache(
            "hqq", config, nbits=bits, q_group_size=group, residual_length=residual)
    for bits in (4, 2):
        out[f"transformers quanto {bits}-bit"] = lambda bits=bits: QuantizedCache(
            "quanto", config, nbits=bits, q_group_size=group, residual_length=residual)
    out["transformers fp8 (per tensor)"] = lambda: QuantizedCache("fp8", config)
    return out


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor reachable from obj (tensor subclasses through their inner tensors)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(o, seen) for o in vars(obj).values())
    return 0


@torch.no_grad()
def score_window(model, ids: torch.Tensor, cache, chunk: int) -> tuple[float, int]:
    """Sum of NLL over ids[1:] with ids fed through `cache` chunk by chunk."""
    nll, prev_last = 0.0, None
    for s in range(0, ids.numel(), chunk):
        part = ids[s:s + chunk]
        logits = model(part[None], **{cache_keyword(model): cache}, use_cache=True).logits[0].float()
        if prev_last is not None:  # the previous chunk's last position predicts this chunk's first token
            logits = torch.cat([prev_last, logits])
            targets = part
        else:
            targets = part[1:]
        prev_last = logits[-1:]
        nll += F.cross_entropy(logits[:-1][: targets.numel()], targets, reduction="sum").item()
    return nll, ids.numel() - 1


@torch.no_grad()
def decode_rate(model, cache, last_id: int, steps: int) -> float:
    tok = torch.tensor([[last_id]])
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = model(tok, **{cache_keyword(model): cache}, use_cache=True).logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - t0)


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    text = open(args.text, encoding="utf-8").read() if args.text else wikitext2("test")
    ids = token_ids(tok, text)
    spans = windows(ids.numel(), args.window, max_windows=args.windows)
    rows = []
    for name, make in settings(model.config, args.group, args.residual).items():
        try:
            nll = n = 0
            for i, (start, _) in enumerate(spans):
                cache = make()
                w = ids[start:start + args.window]
                a, b = score_window(model, w, cache, args.chunk)
                nll, n = nll + a, n + b
                if i == 0:
                    held = cache.nbytes() if hasattr(cache, "nbytes") else tensor_bytes(cache.layers)
                    bpt = held / cache.get_seq_length()
                    # lowbit's quantized part alone (codes, scales, zeros), without the fp32 residual window
                    q = [(l.qkeys, l.qvalues, l.quantized_length) for l in cache.layers if hasattr(l, "qkeys")]
                    qpt = sum(k.nbytes + v.nbytes for k, v, _ in q) / q[0][2] if q else None
                    rate = decode_rate(model, cache, int(w[-1]), args.decode)
            rows.append(dict(name=name, ppl=math.exp(nll / n), bytes_per_token=bpt, quantized_bytes_per_token=qpt,
                             tok_s=rate))
        except Exception as e:  # a backend that does not run here is reported, not fatal
            rows.append(dict(name=name, error=f"{type(e).__name__}: {str(e)[:120]}"))
        print(_fmt(rows[-1], rows[0]), flush=True)
    return rows


def _fmt(r: dict, base: dict) -> str:
    if "error" in r:
        return f"| {r['name']} | does not run: {r['error']} | | | | | |"
    d = 100 * (r["ppl"] / base["ppl"] - 1)
    return (f"| {r['name']} | {r['ppl']:.4f} | {d:+.2f}% | {r['bytes_per_token']:,.0f} | "
            f"{r['bytes_per_token'] / base['bytes_per_token']:.3f} | "
            f"{'' if r['quantized_bytes_per_token'] is None else format(r['quantized_bytes_per_token'], ',.0f')} | "
            f"{r['tok_s']:.1f} |")


def plot(rows: list[dict], path: str) -> None:
    from lowbit.analysis.plots import atomic_png, pyplot
    plt = pyplot()
    base = rows[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if "error" in r:
            continue
        d = 100 * (r["ppl"] / base["ppl"] - 1)
        ax.scatter(r["bytes_per_token"], max(d, 1e-3), marker="o" if r["name"].startswith("lowbit") else "x")
        ax.annotate(r["name"].replace("transformers ", "tf "), (r["bytes_per_token"], max(d, 1e-3)), fontsize=7)
    ax.set_xscale("log"); ax.set_yscale("log")
    ax.set_xlabel("KV cache bytes per token at 2048 tokens (log)")
    ax.set_ylabel("perplexity change vs fp32 cache, % (log)")
    ax.set_title("SmolLM2-135M, wikitext-2 test, quantized KV cache")
    atomic_png(fig, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--residual", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--png", default=None)
    p.add_argument("--text", default=None, help="wikitext-2 test.txt (default: ../shared beside the repo)")
    args = p.parse_args()
    print(f"SmolLM2-135M fp32, {args.windows} x {args.window} tokens, chunks of {args.chunk}, group {args.group}, "
          f"residual {args.residual}, {args.threads} threads")
    print("| cache | ppl | change | bytes/token held | vs fp32 | bytes/token, quantized part | decode tok/s |\n"
          "|---|---|---|---|---|---|---|")
    rows = run(args)
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
