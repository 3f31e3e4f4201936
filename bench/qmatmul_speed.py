"""The packed-code matmul kernels (lowbit/kernels/qmatmul.py) against F.linear, in one process.

    matmul   x @ W^T for the issue's shapes, as a ratio to bf16 and fp32 F.linear of the same
             shape (> 1 = the kernel is faster), and to the torch path QuantLinear ran before
             (dequantize, then F.linear); candidates take turns, each round timing each once,
             and the fastest round counts (the machine is shared: the minimum is the run least
             disturbed by other work)
    numba    a plain numba GEMV of the same int4 weight (the technology choice, docs/benchmarks.md)
    bandwidth  weight bytes per call / time, against a warm copy of 256 MiB in the same run
    decode   greedy decode and prefill tokens/s of SmolLM2-135M: fp32, bf16, and w8 / w4g64 / nf4
             (RTN) with fp32 activations and with bf16 ones (recipe@bf16: quantized, then
             .to(bfloat16)), with the kernels and with the torch path; gguf-q4_0 / gguf-q8_0: the model
             written as that GGUF file by lowbit and loaded with lowbit.load(..., keep_quantized=True)
    (bench/decode_1b.py: the same for a 1B-parameter Llama with random weights, and llama.cpp)

    .venv/bin/python bench/qmatmul_speed.py                 # everything, 2 threads
    .venv/bin/python bench/qmatmul_speed.py --skip-decode   # matmul, numba and bandwidth only
    .venv/bin/python bench/qmatmul_speed.py --threads 1 --clock cpu   # on a busy machine: CPU time
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit.kernels import qmatmul
from lowbit.nn.kernel_plan import plan
from lowbit.pipeline import RECIPES, get_recipe

SHAPES = [(1, 4096, 4096), (1, 576, 1536), (1, 1536, 576), (8, 4096, 4096), (512, 4096, 4096)]  # M, K, N
SCHEMES = ["w4g64", "w4g64-sym", "nf4", "w8", "fp8"]


CLOCK = time.perf_counter  # --clock cpu: time.thread_time, this thread's CPU time (with --threads 1)


def fastest(fns: dict, rounds: int, budget_s: float = 0.05) -> dict:
    """Seconds per call of each function: the best of `rounds` rounds, candidates in turn."""
    for f in fns.values():
        f()
    reps = {}
    for k, f in fns.items():
        t0 = CLOCK()
        f()
        reps[k] = max(1, int(budget_s / max(CLOCK() - t0, 1e-6)))
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = CLOCK()
            for _ in range(reps[k]):
                f()
            best[k] = min(best[k], (CLOCK() - t0) / reps[k])
    return best


@contextlib.contextmanager
def torch_path():
    """QuantLinear without the kernels: what it ran before them."""
    real = qmatmul.linear
    qmatmul.linear = lambda *a, **k: None
    try:
        yield
    finally:
        qmatmul.linear = real


def matmul(rounds: int) -> None:
    print("| shape MxKxN | scheme | kernel ms | vs bf16 F.linear | vs fp32 F.linear | vs torch path |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for M, K, N in SHAPES:
        w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
        wb, xb = w.bfloat16(), x.bfloat16()
        for name in SCHEMES:
            q = lowbit.core.quantize(w, RECIPES[name].weights)
            p = plan(q)
            t = fastest({"kernel": lambda: qmatmul.linear(x, p), "bf16": lambda: F.linear(xb, wb),
                         "fp32": lambda: F.linear(x, w), "torch": lambda: F.linear(x, q.dequantize())},
                        rounds if M * K * N < 1e9 else max(2, rounds // 3))
            print(f"| {M}x{K}x{N} | {name} | {t['kernel'] * 1e3:.3f} | {t['bf16'] / t['kernel']:.2f} | "
                  f"{t['fp32'] / t['kernel']:.2f} | {t['torch'] / t['kernel']:.2f} |")
        # bf16 input: gemv_bf16 (decode); prefill: int8 activations (the default for bf16, integer codes)
        # and, for comparison, the float route (the bf16 weight dequantized, then F.linear)
        for name in ("w4g64", "w4g64-sym", "w8", "nf4"):
            p = plan(lowbit.core.quantize(w, RECIPES[name].weights))
            for mode in ("auto", "float") if M > qmatmul.GEMV_MAX_TOKENS else ("auto",):
                def kernel(mode=mode):
                    with qmatmul.activations(mode):
                        return qmatmul.linear(xb, p)
                t = fastest({"kernel": kernel, "bf16": lambda: F.linear(xb, wb)},
                            rounds if M * K * N < 1e9 else max(2, rounds // 3))
                print(f"| {M}x{K}x{N} bf16 input, activations={mode} | {name} | {t['kernel'] * 1e3:.3f} | "
                      f"{t['bf16'] / t['kernel']:.2f} | - | - |")


def numba_gemv():
    """The obvious numba GEMV over the same packed uint4 codes (affine, fp16 scales widened)."""
    import numba
    import numpy as np

    @numba.njit(parallel=True, fastmath=True, cache=False)
    def gemv(codes, scales, zeros, x, K, g, out):
        G = (K + g - 1) // g
        for r in numba.prange(out.shape[0]):
            tot = np.float32(0)
            for j in range(G):
                acc = np.float32(0)
                xs = np.float32(0)
                for k in range(j * g, min(K, (j + 1) * g), 2):
                    b = codes[(r * K + k) // 2]
                    acc += np.float32(b & 15) * x[k] + np.float32(b >> 4) * x[k + 1]
                    xs += x[k] + x[k + 1]
                tot += scales[r * G + j] * (acc - zeros[r * G + j] * xs)
            out[r] = tot
    return gemv


def technology(rounds: int) -> None:
    import numba

    M, K, N = 1, 4096, 4096
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    q = lowbit.core.quantize(w, RECIPES["w4g64"].weights)
    p = plan(q)
    codes, s, z, xn = q.codes.numpy(), q.scales.float().reshape(-1).numpy(), q.zeros.float().reshape(-1).numpy(), x[0].numpy()
    out = torch.empty(N).numpy()
    gemv = numba_gemv()
    numba.set_num_threads(torch.get_num_threads())
    gemv(codes, s, z, xn, K, 64, out)  # compile
    ref = F.linear(x.double(), q.dequantize().double())[0]
    err = (torch.from_numpy(out).double() - ref).abs().max().item()
    xb, wb = x.bfloat16(), w.bfloat16()
    t = fastest({"c++": lambda: qmatmul.linear(x, p), "numba": lambda: gemv(codes, s, z, xn, K, 64, out),
                 "bf16": lambda: F.linear(xb, wb)}, rounds)
    print(f"\nint4 GEMV 1x4096x4096 (w4g64): c++ {t['c++'] * 1e3:.3f} ms, numba {t['numba'] * 1e3:.3f} ms "
          f"(c++ {t['numba'] / t['c++']:.1f}x faster; numba max error {err:.2g}), bf16 F.linear "
          f"{t['bf16'] * 1e3:.3f} ms")


def bandwidth(rounds: int) -> None:
    src = torch.ones(64 << 20)  # 256 MiB: far beyond the caches
    dst = torch.empty_like(src)
    t = fastest({"copy": lambda: dst.copy_(src)}, max(3, rounds // 3))["copy"]
    copy_gbs = src.nbytes / t / 1e9
    print(f"\nwarm copy: {copy_gbs:.1f} GB/s (bytes read per second)")
    print("| GEMV 1x4096x4096 | weight MB | ms | GB/s | of copy |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(4096, 4096, generator=g), torch.randn(1, 4096, generator=g)
    rows = {"fp32 F.linear": (w.nbytes, lambda: F.linear(x, w))}
    wb, xb = w.bfloat16(), x.bfloat16()
    rows["bf16 F.linear"] = (wb.nbytes, lambda: F.linear(xb, wb))
    for name in SCHEMES:
        q = lowbit.core.quantize(w, RECIPES[name].weights)
        p = plan(q)
        rows[name] = (q.nbytes, (lambda p: lambda: qmatmul.linear(x, p))(p))
    t = fastest({k: f for k, (_, f) in rows.items()}, rounds)
    for k, (nbytes, _) in rows.items():
        gbs = nbytes / t[k] / 1e9
        print(f"| {k} | {nbytes / 1e6:.1f} | {t[k] * 1e3:.3f} | {gbs:.1f} | {gbs / copy_gbs:.2f} |")


def decode(new_tokens: int, runs: int, which: list[str], with_torch_path: bool) -> None:
    from lowbit.eval import generation_speed
    from lowbit.io import load_model

    model, tok = load_model("smollm2-135m")
    models = {}
    for k in which:  # recipe[:method][@bf16]: quantized, then .to(bf16): the same codes, bf16 activations
        recipe, _, act = k.partition("@")
        models[k] = (copy.deepcopy(model).to(torch.bfloat16) if k == "bf16" else model if k == "fp32"
                     else gguf_kept(model, k.removeprefix("gguf-")) if k.startswith("gguf-")
                     else lowbit.quantize(copy.deepcopy(model), get_recipe(*recipe.split(":")), progress=False))
        if act == "bf16":
            models[k] = models[k].to(torch.bfloat16)

    def speed(m, new_tokens=new_tokens, runs=runs):
        return generation_speed(m, tok, prompt_tokens=128, new_tokens=new_tokens, runs=runs, progress=False)

    print("\n| SmolLM2-135M | decode tok/s | vs bf16 | prefill tok/s (128) | torch path decode tok/s |")
    print("|---|---|---|---|---|")
    bf = None
    for k, m in models.items():
        s = speed(m)
        bf = bf or (s.decode_tokens_per_s if k == "bf16" else None)
        before = "-"
        if with_torch_path and k not in ("fp32", "bf16"):
            with torch_path():  # slow: fewer tokens, one timed run
                before = f"{speed(m, new_tokens=8, runs=1).decode_tokens_per_s:.1f}"
        ratio = f"{s.decode_tokens_per_s / bf:.2f}" if bf else "-"
        print(f"| {k} | {s.decode_tokens_per_s:.1f} | {ratio} | {s.prefill_tokens_per_s:.0f} | {before} |", flush=True)


def gguf_kept(model, recipe: str):
    """The model written as a GGUF file of `recipe` and read back with its q4_0/q8_0 layers quantized."""
    with tempfile.TemporaryDirectory() as d:
        path = lowbit.save(model, Path(d) / f"model-{recipe}.gguf", recipe=recipe, source="smollm2-135m")
        return lowbit.load(path, keep_quantized=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: the calling thread's CPU time, which other processes on a shared machine do not "
                         "inflate; meaningful with --threads 1 only (other threads' work is not counted)")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="timed generation runs per model (median)")
    ap.add_argument("--skip-matmul", action="store_true")
    ap.add_argument("--models", default="bf16,fp32,w8,w4g64,nf4,w8@bf16,w4g64@bf16,nf4@bf16",
                    help="decode: bf16, fp32, recipe names, recipe@bf16 (quantized, then .to(bfloat16))")
    ap.add_argument("--skip-torch-path", action="store_true", help="decode: skip the slow torch-path runs")
    a = ap.parse_args()
    if a.clock == "cpu" and a.threads != 1:
        ap.error("--clock cpu counts only the calling thread: use it with --threads 1")
    global CLOCK
    CLOCK = time.thread_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    print(f"clock {a.clock}, threads {torch.get_num_threads()}, backend: {qmatmul.backend()}, torch {torch.__version__}")
    if not a.skip_matmul:
        with torch.inference_mode():
            matmul(a.rounds)
            technology(a.rounds)
            bandwidth(a.rounds)
    if not a.skip_decode:
        decode(a.new_tokens, a.runs, a.models.split(","), not a.skip_torch_path)


if __name__ == "__main__":
    main()
