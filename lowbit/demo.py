"""The main job, for now: how each format and scheme treats real SmolLM2-135M weights.

Quantizes every projection of a few transformer blocks with each scheme and
prints bits per weight and the error (SQNR, max error, clipped share).
"""
from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from .core import error_stats, quantize_tensor
from .io import builtin_model_path, read_gguf_tensors

SCHEMES = [
    ("int8 per-channel", "int8", dict(granularity="channel")),
    ("fp8_e4m3 per-channel", "fp8_e4m3", dict(granularity="channel")),
    ("mxfp8", "mxfp8", {}),
    ("mxfp6", "mxfp6", {}),
    ("int4 g64 symmetric", "int4", dict(granularity="group", group_size=64)),
    ("uint4 g64 affine", "uint4", dict(granularity="group", group_size=64, symmetric=False)),
    ("int4 g64 mse clip", "int4", dict(granularity="group", group_size=64, range="mse")),
    ("int4 g128 (ragged)", "int4", dict(granularity="group", group_size=128)),
    ("nf4 g64", "nf4", {}),
    ("nf4 g64 double-quant", "nf4-dq", {}),
    ("mxfp4", "mxfp4", {}),
    ("nvfp4", "nvfp4", {}),
    ("kmeans4 per-channel", "kmeans4", dict(granularity="channel")),
    ("int3 g64 affine", "uint3", dict(granularity="group", group_size=64, symmetric=False)),
    ("ternary absmean per-channel", "ternary", dict(granularity="channel", range="absmean")),
]


def run(blocks: int = 2) -> list[dict]:
    path = builtin_model_path("smollm2-135m")
    names = [f"blk.{b}.{p}.weight" for b in range(blocks)
             for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    weights = read_gguf_tensors(path, names)
    rows = []
    for label, fmt, kw in tqdm(SCHEMES, desc="schemes", unit="scheme"):
        nbytes = numel = 0
        signal = noise = 0.0
        max_abs = clipped = 0.0
        for w in weights.values():
            q = quantize_tensor(w, fmt, **kw)
            e = error_stats(w, q)
            nbytes, numel = nbytes + q.nbytes, numel + w.numel()
            noise += e.mse * w.numel()
            signal += float(w.double().pow(2).sum())
            max_abs = max(max_abs, e.max_abs)
            clipped += (e.clipped or 0.0) * w.numel()
        sqnr = 10 * torch.log10(torch.tensor(signal / noise)).item() if noise else float("inf")
        rows.append(dict(scheme=label, bpw=8 * nbytes / numel, sqnr=sqnr, max_abs=max_abs, clipped=clipped / numel))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--blocks", type=int, default=2, help="how many transformer blocks to quantize")
    args = ap.parse_args(argv)
    rows = run(args.blocks)
    print(f"\nSmolLM2-135M, {args.blocks} blocks of weights (note: the shipped weights are Q4_1, so 32-aligned "
          "affine 4-bit schemes look better here than on an fp16 original)")
    print(f"{'scheme':<30} {'bits/w':>7} {'SQNR dB':>8} {'max err':>8} {'clipped':>8}")
    for r in rows:
        print(f"{r['scheme']:<30} {r['bpw']:>7.3f} {r['sqnr']:>8.2f} {r['max_abs']:>8.4f} {r['clipped']:>8.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
