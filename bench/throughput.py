"""Quantize-and-pack throughput of lowbit.quantize_tensor against a plain copy.

For each weight shape and dtype, every repetition times two copies and then each
scheme on the same tensor, so the copies are measured in the same run and under
the same load as the schemes:

    clone       w.clone(): allocates, so a large tensor pays fresh pages
    warm copy   dst.copy_(w) into a buffer allocated once: the honest baseline

Reported: the median over repetitions (after one warm-up call each, which is
also when numba compiles or loads the fused kernel), GB/s of input bytes, and
throughput as a ratio to each copy (1.0 = as fast as that copy; the target for
int4 g128 and fp8 per channel is >= 0.5 of the warm copy).

    .venv/bin/python bench/throughput.py           # 4096^2 and 8192^2, fp32 and bf16
    .venv/bin/python bench/throughput.py --quick   # 4096^2 only, fewer repetitions
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import lowbit

SCHEMES = {
    "int4 g128": ("int4", dict(granularity="group", group_size=128)),
    "nf4 g64": ("nf4", {}),
    "fp8_e4m3 channel": ("fp8_e4m3", dict(granularity="channel")),
    "mxfp4": ("mxfp4", {}),
    "nvfp4": ("nvfp4", {}),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(shape: tuple[int, int], dtype: torch.dtype, schemes: dict, reps: int) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    nbytes = w.numel() * w.element_size()
    dst = torch.empty_like(w)
    calls = {"clone": lambda: w.clone(), "warm copy": lambda: dst.copy_(w)}
    for name, (fmt, kw) in schemes.items():
        calls[name] = lambda fmt=fmt, kw=kw: lowbit.quantize_tensor(w, fmt, **kw)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():  # warm-up
        fn()
    for _ in range(reps):
        for k, fn in calls.items():
            times[k].append(timed(fn))
    clone, warm = statistics.median(times["clone"]), statistics.median(times["warm copy"])
    rows = []
    for k, ts in times.items():
        t = statistics.median(ts)
        rows.append((k, f"{shape[0]}x{shape[1]}", str(dtype).removeprefix("torch."), t * 1e3,
                     nbytes / t / 1e9, clone / t, warm / t))
    return rows


def fused_kernel() -> str:
    backend = lowbit.kernels.fused_backend()
    return f"fused kernel: {backend}" if backend else "fused kernel off (numba not installed): pure-torch path"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, 3 repetitions")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per measurement (default 5, 3 with --quick)")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated subset of: " + ", ".join(SCHEMES))
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of: fp32, bf16")
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.quick else 5)
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (8192, 8192)]
    schemes = {k: SCHEMES[k] for k in args.schemes.split(",")}
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load:.2f} at start; "
          f"median of {reps} after a warm-up; {fused_kernel()}")
    print("| scheme | shape | dtype | ms | GB/s | x clone | x warm copy |")
    print("|---|---|---|---:|---:|---:|---:|")
    for shape in shapes:
        for dtype in dtypes:
            for name, shp, dt, ms, gbs, r_clone, r_warm in bench(shape, dtype, schemes, reps):
                print(f"| {name} | {shp} | {dt} | {ms:.1f} | {gbs:.2f} | {r_clone:.2f} | {r_warm:.2f} |",
                      flush=True)
    if hasattr(os, "getloadavg"):
        print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    if lowbit.kernels.fused_backend():
        import numba
        print(f"# numba threading layer: {numba.threading_layer()}, {numba.get_num_threads()} threads")


if __name__ == "__main__":
    main()
