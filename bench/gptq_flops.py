"""GPTQ's arithmetic per transformer block, and the time it predicts on this machine.

    flops   what one block of a Llama shape costs under lowbit's sequential GPTQ runner
            (pipeline/sequential.py, methods/gptq.py), phase by phase, for N calibration tokens:
              forward_stats      the statistics pass: every Linear up to down_proj's input (the
                                 runner stops there: StatsComplete), attention scores and values
              forward_quantized  the quantized block on every batch (the next block's inputs)
              hessian            X^T X once per distinct input: attention input (q/k/v share it),
                                 o_proj's input, MLP input (gate/up share it), down_proj's input;
                                 three of its four quarter products (it is symmetric: 1.5 N n^2)
              cholesky           per distinct input: Cholesky of the reversed, dampened H (n^3/3,
                                 float64)
              inverse            its triangular inverse by halves in matrix products (2n^3/3, float64),
                                 which is the upper Cholesky factor of H^-1 reversed (methods/gptq.py)
              columns            per layer: the lazy-batch trailing updates E1 @ U[i1:i2, i2:]
                                 (~rows * cols^2) plus the in-block updates (~2 * rows * cols * 128)
              losses             per layer: tr(D H D^T) for GPTQ's and RTN's weights (fallback) and
                                 ||W X||^2 (report): one [rows, cols] x [cols, cols] product each
            The runner's phases: statistics = forward_stats + hessian; solve = cholesky + inverse +
            columns + losses; forward = forward_quantized.
    rates   the machine's GEMM rate in float32, bfloat16 and float64 with torch at --threads
            threads (square-ish products of the sizes above), and its float64 Cholesky rate
    predict seconds per block = sum of each phase's flops / the rate of the dtype it runs in

    PYTHONPATH=. .venv/bin/python -P bench/gptq_flops.py --threads 2            # 8B, 8x256 and 128x2048
    PYTHONPATH=. .venv/bin/python -P bench/gptq_flops.py --shape 70b --calib 128x2048
    PYTHONPATH=. .venv/bin/python -P bench/gptq_flops.py --factor-baseline 4096   # the factor before / now
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch

from lowbit.core.hessian import native_bf16


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int

    @property
    def layers(self) -> dict[str, tuple[int, int]]:
        """{name: (rows, cols)} of the block's Linear weights."""
        d, f, kv = self.hidden, self.ffn, self.hidden // self.heads * self.kv_heads
        return {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
                "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}


SHAPES = {"8b": Shape(4096, 14336, 32, 8), "70b": Shape(8192, 28672, 64, 8)}
BLOCKS = {"8b": 32, "70b": 80}
# which dtype each phase runs in (calibration_dtype "auto" on a CPU with AVX512-BF16: bf16 forwards
# and X^T X products; the factor in float64; the column solve in float32; the losses' D H product in
# bf16 (core/hessian.output_error), float32 on a CPU without native bf16)
PHASE_DTYPE = {"forward_stats": "bf16", "forward_quantized": "bf16", "hessian": "bf16", "cholesky": "chol64",
               "inverse": "fp64", "columns": "fp32", "losses": "bf16" if native_bf16() else "fp32"}
RUNNER_PHASE = {"forward_stats": "statistics", "hessian": "statistics", "cholesky": "solve", "inverse": "solve",
                "columns": "solve", "losses": "solve", "forward_quantized": "forward"}


def block_flops(s: Shape, tokens: int, window: int, loss_products: int = 3) -> dict[str, float]:
    """Floating-point operations (multiply and add counted apart) of one block, by phase.

    tokens: calibration tokens in all; window: tokens per sequence (attention is quadratic in it).
    loss_products: [rows, cols] x [cols, cols] products per layer for the layer losses."""
    L = s.layers
    params = sum(r * c for r, c in L.values())
    down = L["down_proj"][0] * L["down_proj"][1]
    attention = 2 * 2 * tokens * (window + 1) / 2 * s.hidden  # QK^T and PV, causal: half the square
    inputs = [s.hidden, s.hidden, s.hidden, s.ffn]  # distinct inputs of the Linear layers
    block = 128
    return {
        "forward_stats": 2 * tokens * (params - down) + attention,
        "forward_quantized": 2 * tokens * params + attention,
        "hessian": sum(1.5 * tokens * n * n for n in inputs),  # three quarter products (stats.add_gram)
        "cholesky": sum(n ** 3 / 3 for n in inputs),
        "inverse": sum(2 * n ** 3 / 3 for n in inputs),
        "columns": sum(r * c * c + 2 * r * c * block for r, c in L.values()),
        "losses": loss_products * sum(2 * r * c * c for r, c in L.values()),
    }


def _time(fn, repeat: int = 3) -> float:
    fn()  # warm up (allocation, first-touch)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rates(threads: int, m: int = 2048, k: int = 4096, n: int = 4096) -> dict[str, float]:
    """GFLOP/s of torch.mm [m, k] x [k, n] in fp32, bf16 and fp64, and of float64 Cholesky (n x n)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp64", torch.float64)):
        a = torch.randn(m, k, generator=g).to(dtype)
        b = torch.randn(k, n, generator=g).to(dtype)
        out[name] = 2 * m * k * n / _time(lambda a=a, b=b: a @ b) / 1e9
    x = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = x @ x.T / n + torch.eye(n, dtype=torch.float64)
    out["chol64"] = n ** 3 / 3 / _time(lambda: torch.linalg.cholesky(h)) / 1e9
    return out


def predict(s: Shape, tokens: int, window: int, rates: dict[str, float], loss_products: int = 3) -> dict[str, float]:
    """Seconds per phase of one block at `rates` (GFLOP/s by dtype)."""
    return {p: f / (rates[PHASE_DTYPE[p]] * 1e9) for p, f in block_flops(s, tokens, window, loss_products).items()}


def factor_baseline(n: int, threads: int) -> dict[str, float]:
    """Seconds of the inverse Hessian factor at n inputs: the path before issue 25 (Cholesky,
    LAPACK's potri, Cholesky of the inverse) against methods/gptq.py's (reversed Cholesky and a
    triangular inverse in matrix products), same H, one call each."""
    import sys

    import lowbit.methods  # noqa: F401
    m = sys.modules["lowbit.methods.gptq"]
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, n, generator=g)
    H = 2 * x.T @ x / 2048
    dead = torch.zeros(n, dtype=torch.bool)

    def before():
        Hd = H.double() + 0.01 * float(H.diagonal().double().mean()) * torch.eye(n, dtype=torch.float64)
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True).float()
    out = {}
    for name, fn in (("before", before), ("now", lambda: m._inverse_hessian_factor(H, dead, 0.01))):
        t0 = time.perf_counter()
        out[name] = fn()
        out[name + "_s"] = time.perf_counter() - t0
    err = float((out["now"] - out["before"]).abs().max() / out["before"].abs().max())
    return {"n": n, "before_s": out["before_s"], "now_s": out["now_s"], "max_rel_diff": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="8b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", default="8x256,128x2048", help="windows x tokens, comma-separated")
    ap.add_argument("--rates", help="GFLOP/s as JSON ({'fp32':..,'bf16':..,'fp64':..,'chol64':..}) instead of measuring")
    ap.add_argument("--factor-baseline", type=int, metavar="N", help="time the inverse Hessian factor at N inputs, "
                    "before and now, and exit")
    a = ap.parse_args()
    if a.factor_baseline:
        print("FACTOR " + json.dumps(factor_baseline(a.factor_baseline, a.threads)))
        return
    rates = json.loads(a.rates) if a.rates else gemm_rates(a.threads)
    print(f"GEMM GFLOP/s at {a.threads} threads: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    s = SHAPES[a.shape]
    for spec in a.calib.split(","):
        windows, window = map(int, spec.split("x"))
        f = block_flops(s, windows * window, window)
        t = predict(s, windows * window, window, rates)
        print(f"\n{a.shape} block, {windows} x {window} tokens: {sum(f.values()) / 1e12:.2f} TFLOP, "
              f"predicted {sum(t.values()):.1f} s per block, {sum(t.values()) * BLOCKS[a.shape] / 3600:.2f} h "
              f"for {BLOCKS[a.shape]} blocks")
        print("| phase | dtype | TFLOP | predicted s |\n|---|---|---:|---:|")
        for p in f:
            print(f"| {p} | {PHASE_DTYPE[p]} | {f[p] / 1e12:.3f} | {t[p]:.1f} |")
    print("RATES " + json.dumps(rates))


if __name__ == "__main__":
    main()
