"""Round-to-nearest GGUF writing, lowbit against llama.cpp's own pipeline, in one run on the same threads:

    lowbit      lowbit quantize DIR --recipe q4_k_m --method rtn --out lowbit.gguf
    llama.cpp   lowbit quantize DIR --recipe f32 --out f32.gguf   (the converter step: bf16 -> F32 GGUF)
                llama-quantize f32.gguf llama.gguf Q4_K_M THREADS

Each command runs as its own process (wall seconds, peak RSS from wait4). Then every tensor of the two
files must be byte-equal (gguf-py's GGUFReader: same names, types, shapes and bytes); exit status 1
if one is not. The checkpoint is bench/streaming.py's synthetic Llama (random bf16 N(0, 0.02) weights,
SmolLM2's tokenizer), made once in DIR.

    PYTHONPATH=. .venv/bin/python bench/gguf_rtn_speed.py --shape 1b --layers 4 --dir /tmp/lowbit-1b-4l
    # the 8B shape, a 2-block cut of bench/streaming.py's 8B checkpoint (per-block costs)
    PYTHONPATH=. .venv/bin/python bench/gguf_rtn_speed.py --shape 8b --dir /tmp/lowbit-8b --blocks 2
    # per type: CPU microseconds per 256 values, numpy reference against the numba kernel, one thread
    PYTHONPATH=. .venv/bin/python bench/gguf_rtn_speed.py --kernels
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# bench/streaming.py by path: bench/ on sys.path would shadow the `kernels` package transformers imports
_spec = importlib.util.spec_from_file_location("bench_streaming", ROOT / "bench" / "streaming.py")
streaming = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(streaming)
first_blocks, make = streaming.first_blocks, streaming.make

FTYPES = {"q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q3_k_m": "Q3_K_M", "q2_k": "Q2_K",
          "q6_k": "Q6_K", "q4_0": "Q4_0", "q8_0": "Q8_0", "iq4_nl": "IQ4_NL"}


def timed(cmd: list, threads: int) -> tuple[float, float]:
    """Run cmd -> (wall seconds, peak RSS GiB of that process alone)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status:
        raise SystemExit(f"{cmd[0]} {cmd[1]} failed ({status}):\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 2**20


def differing_tensors(a: Path, b: Path) -> list[str]:
    """Names of tensors whose type, shape or bytes differ between two GGUF files (or that one lacks)."""
    import gguf

    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    bad = sorted(set(ta) ^ set(tb))
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if (x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape)
                or not np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8))):
            bad.append(name)
    return bad


def kernel_table(rows: int = 512, n: int = 4096) -> None:
    """CPU time (process_time, one thread) per 256 values of N(0, 1) rows, reference and kernel, bytes equal."""
    import torch

    from lowbit.core.ggml_blocks import GGML_TYPES

    torch.set_num_threads(1)
    x = np.random.default_rng(0).standard_normal((rows, n)).astype(np.float32)
    print("| type | numpy reference us / 256 values | numba kernel | speed-up |\n|---|---:|---:|---:|")
    for t in GGML_TYPES.values():
        if t.fit is None:
            continue
        blocks = x.reshape(-1, t.block_size)
        t.quantize(blocks[:64])  # compiled (or loaded from numba's cache) before the clock starts
        per = []
        for run in (t.quantize_reference, t.quantize):
            c0 = time.process_time()
            out = run(blocks)
            per.append((time.process_time() - c0) / x.size * 256 * 1e6)
            per.append(out)
        assert np.array_equal(per[1], per[3]), t.name
        print(f"| {t.name} | {per[0]:.1f} | {per[2]:.2f} | {per[0] / per[2]:.0f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["1b", "8b"], default="1b")
    ap.add_argument("--layers", type=int, help="make the checkpoint with this many blocks (default: the shape's)")
    ap.add_argument("--blocks", type=int, help="use only the first N blocks of DIR (a view, bench/streaming.py)")
    ap.add_argument("--dir", type=Path, help="the synthetic checkpoint (made if absent)")
    ap.add_argument("--kernels", action="store_true", help="only the per-type kernel table (no checkpoint)")
    ap.add_argument("--recipe", default="q4_k_m", choices=FTYPES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lowbit-gguf-rtn"), help="where the .gguf files go")
    ap.add_argument("--llama-cpp", type=Path, default=Path(os.environ.get("LOWBIT_LLAMA_CPP", "/tmp/llama.cpp/build/bin")))
    a = ap.parse_args()
    if a.kernels:
        return kernel_table()
    if a.dir is None:
        sys.exit("--dir: the synthetic checkpoint's folder (made if absent)")
    quantize = a.llama_cpp / "llama-quantize"
    if not quantize.exists():
        sys.exit(f"no {quantize}: run bench/llama_cpp.sh or pass --llama-cpp")
    if not (a.dir / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        make(a.dir, a.shape, layers=a.layers)
        print(f"wrote {a.dir} in {time.perf_counter() - t0:.0f} s")
    folder = first_blocks(a.dir, a.blocks) if a.blocks else a.dir
    config = json.loads((folder / "config.json").read_text())
    if not config.get("architectures"):  # made before make() wrote it: transformers would load a bare LlamaModel
        if folder == a.dir:
            sys.exit(f"{a.dir}/config.json has no 'architectures': remake it, or pass --blocks (a view gets one)")
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}, indent=1))
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    ours, f32, theirs = a.work / "lowbit.gguf", a.work / "f32.gguf", a.work / "llama.gguf"
    lowbit = [sys.executable, "-m", "lowbit.cli", "quantize", folder, "--method", "rtn"]
    rows = {
        "lowbit quantize --recipe " + a.recipe: timed(lowbit + ["--recipe", a.recipe, "--out", ours], a.threads),
        "lowbit quantize --recipe f32": timed(lowbit + ["--recipe", "f32", "--out", f32], a.threads),
        f"llama-quantize {FTYPES[a.recipe]} {a.threads}": timed([quantize, f32, theirs, FTYPES[a.recipe], a.threads],
                                                                a.threads),
    }
    bad = differing_tensors(ours, theirs)
    n = len(__import__("gguf").GGUFReader(theirs).tensors)
    (lb, _), (f, f_rss), (q, q_rss) = rows.values()
    if a.blocks:
        shutil.rmtree(folder)
    print(f"\n{folder.name} ({a.shape} shape), {a.recipe}, {a.threads} threads; "
          f"tensors byte-equal: {n - len(bad)}/{n}")
    print("| command | wall s | peak RSS GiB |\n|---|---|---|")
    for name, (s, rss) in rows.items():
        print(f"| {name} | {s:.1f} | {rss:.2f} |")
    print(f"| f32 write + llama-quantize | {f + q:.1f} | {max(f_rss, q_rss):.2f} |")
    print(f"\nlowbit / (f32 write + llama-quantize) = {lb / (f + q):.2f}; lowbit / llama-quantize alone = {lb / q:.2f}")
    if bad:
        print(f"DIFFERENT tensors: {', '.join(bad[:10])}")
        sys.exit(1)


if __name__ == "__main__":
    main()
