"""The kernel routes added for issue 11's second round, one thread, CPU time (robust on a shared
machine; with --threads 2 --clock wall on a quiet one):

    layouts   one GEMV call of each 4-bit layout at SmolLM2's shapes: w4g64 (input-axis groups),
              w4g64:hqq (output-axis groups, HQQ's), nvfp4 (groups of 16, fp8 scales), against
              fp32 / bf16 F.linear of the same shape
    int8      decode GEMV over 12 different 4096x4096 w4g64 weights in turn (96 MB of codes, beyond
              the caches): float32 x, bf16 x (AVX512-BF16), and the opt-in int8 x (AVX512-VNNI)
    prefill   128 tokens, bf16: dequantize to bf16 (the per-group table route) then F.linear, against
              F.linear of the bf16 weight

    PYTHONPATH=. .venv/bin/python bench/kernel_routes.py
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import lowbit
from lowbit.kernels import qmatmul
from lowbit.nn.kernel_plan import plan
from lowbit.pipeline import get_recipe

CLOCK = time.thread_time


def best(f, calls: int = 1, rounds: int = 5) -> float:
    """Seconds per call: the best of `rounds` rounds of `calls` calls, after one warm-up round."""
    for _ in range(calls):
        f()
    out = float("inf")
    for _ in range(rounds):
        t0 = CLOCK()
        for _ in range(calls):
            f()
        out = min(out, (CLOCK() - t0) / calls)
    return out


def layouts() -> None:
    print("\n| GEMV 1xNxK | w4g64 us | w4g64:hqq us | nvfp4 us | fp32 F.linear us | bf16 F.linear us |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for N, K in [(1536, 576), (576, 1536), (4096, 4096)]:
        w, x = torch.randn(N, K, generator=g), torch.randn(1, K, generator=g)
        row = []
        for spec in ("w4g64", "w4g64:hqq", "nvfp4"):
            m = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False))
            m[0].weight.data.copy_(w)
            lowbit.quantize(m, get_recipe(*spec.split(":")), progress=False)
            row.append(best(lambda: m(x), 100))
        wb, xb = w.bfloat16(), x.bfloat16()
        row += [best(lambda: F.linear(x, w), 100), best(lambda: F.linear(xb, wb), 100)]
        print(f"| 1x{N}x{K} | " + " | ".join(f"{t * 1e6:.0f}" for t in row) + " |")


def int8() -> None:
    g = torch.Generator().manual_seed(0)
    plans = [plan(lowbit.core.quantize(torch.randn(4096, 4096, generator=g), get_recipe("w4g64").weights))
             for _ in range(12)]
    x = torch.randn(1, 4096, generator=g)
    xb = x.bfloat16()
    nbytes = plans[0].codes.nbytes + plans[0].scales.nbytes * 2

    def each(xx):
        return lambda: [qmatmul.linear(xx, p) for p in plans]

    t = {"float32 x": best(each(x)) / 12, "bf16 x": best(each(xb)) / 12}
    with qmatmul.int8_activations():
        t["int8 x (opt-in)"] = best(each(x)) / 12
    print("\n| w4g64 GEMV 1x4096x4096, 12 weights in turn | us per call | GB/s of codes+scales | vs float32 x |")
    print("|---|---|---|---|")
    for k, v in t.items():
        print(f"| {k} | {v * 1e6:.0f} | {nbytes / v / 1e9:.1f} | {t['float32 x'] / v:.2f} |")


def prefill() -> None:
    g = torch.Generator().manual_seed(0)
    print("\n| 128 tokens, bf16 | bf16 F.linear ms | dequantize ms | lowbit route ms | route vs F.linear |")
    print("|---|---|---|---|---|")
    for N, K in [(2048, 2048), (8192, 2048), (2048, 8192)]:
        w = torch.randn(N, K, generator=g)
        p = plan(lowbit.core.quantize(w, get_recipe("w4g64").weights))
        wb, x = w.bfloat16(), torch.randn(128, K, generator=g).bfloat16()
        out = torch.empty(N, K, dtype=torch.bfloat16)
        a, d, r = (best(lambda: F.linear(x, wb), 1, 3), best(lambda: qmatmul.dequantize(p, torch.bfloat16, out), 1, 3),
                   best(lambda: qmatmul.linear(x, p), 1, 3))
        print(f"| 128x{N}x{K} | {a * 1e3:.2f} | {d * 1e3:.2f} | {r * 1e3:.2f} | {a / r:.2f} |")


def main() -> None:
    global CLOCK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--parts", default="layouts,int8,prefill")
    a = ap.parse_args()
    if a.clock == "cpu" and a.threads != 1:
        ap.error("--clock cpu counts the calling thread only: use it with --threads 1")
    CLOCK = time.thread_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}, clock {a.clock}, backend {qmatmul.backend()}, int8 GEMV: {qmatmul.has_i8()}")
    with torch.inference_mode():
        for part in a.parts.split(","):
            globals()[part]()


if __name__ == "__main__":
    main()
