"""Streaming quantization of a checkpoint larger than comfortable: peak memory, input GB/s, seconds
per block (lowbit/io/streaming.py).

    make   writes a synthetic Hugging Face checkpoint with the real shapes of a Llama (random bf16
           weights, N(0, 0.02), sharded 2 GB a file with an index, config.json, and SmolLM2-135M's
           tokenizer files, which the quantized folder carries over)
    run    io.streaming.quantize_checkpoint (what `lowbit quantize DIR --out OUT` runs) in a child
           process: its peak RSS from getrusage, wall time, bytes of tensors read / wall time, the
           seconds of each part (embeddings, each block, output layer, rest)

    PYTHONPATH=. .venv/bin/python -P bench/streaming.py --shape 1b --dir /tmp/lowbit-1b    # 2.5 GB
    PYTHONPATH=. .venv/bin/python -P bench/streaming.py --shape 8b --dir /tmp/lowbit-8b --threads 1   # 16 GB
    # GPTQ over the first 2 blocks (plus the embedding table and output layer, rounded), 8 windows
    # of 256 tokens of wikitext-2 test, activations past 32 MB per boundary spilled to disk
    PYTHONPATH=. .venv/bin/python -P bench/streaming.py --shape 8b --dir /tmp/lowbit-8b --threads 1 \\
        --method gptq --blocks 2 --activation-mb 32
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # Llama 3.2 1B and Llama 3.1 8B
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def make(folder: Path, shape: str, shard_bytes: int = 2 << 30, layers: int | None = None) -> None:
    """Write the checkpoint a shard at a time (at most one shard in memory); `layers` cuts the shape's
    block count (the width stays)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})},
                         torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])  # a causal LM, as real ones say
    with torch.device("meta"):
        names = [(k, tuple(v.shape)) for k, v in LlamaForCausalLM(config).state_dict().items()
                 if not (config.tie_word_embeddings and k == "lm_head.weight")]
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name))
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for k, s in names:
        t = (torch.randn(s, generator=g) * 0.02 if len(s) > 1 else torch.ones(s)).bfloat16()
        shard[k] = t
        size += t.nbytes
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    from lowbit.io.models import load_model

    load_model("smollm2-135m")[1].save_pretrained(folder)  # a tokenizer, as a real checkpoint has
    total = sum((folder / f).stat().st_size for f in files)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=1))


def first_blocks(folder: Path, blocks: int) -> Path:
    """A view of `folder` cut to its first `blocks` blocks (GPTQ over the first few blocks of the 8B):
    config.json with num_hidden_layers=blocks, an index of only their tensors, the same shard files
    (symlinked), the tokenizer files."""
    view = folder.with_name(f"{folder.name}-first{blocks}")
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = blocks
    (view / "config.json").write_text(json.dumps(config, indent=1))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    keep = {k: v for k, v in index["weight_map"].items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks}
    (view / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}, indent=1))
    for f in folder.iterdir():
        if f.suffix == ".safetensors":
            (view / f.name).symlink_to(f.resolve())
        elif f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, view / f.name)
    return view


def child(a) -> None:
    """In the measured process: quantize_checkpoint with per-part times; prints RESULT {json}."""
    from lowbit.cli.common import calibration_split
    from lowbit.eval import token_ids
    from lowbit.io import models
    from lowbit.io.streaming import quantize_checkpoint
    from lowbit.pipeline import get_recipe

    torch.set_num_threads(a.threads)
    times = []
    calib = None
    reports = []
    rates = None
    if a.method != "rtn":
        from bench.gptq_flops import gemm_rates
        from lowbit.pipeline import quantize as pipeline_quantize

        rates = gemm_rates(a.threads)  # measured in this process, at this load, before the run
        run_sequential = pipeline_quantize.run_sequential

        def keep_report(*args, **kw):  # the calibration report (phases, seconds per block)
            reports.append(run_sequential(*args, **kw))
            return reports[-1]
        pipeline_quantize.run_sequential = keep_report
    if a.method != "rtn":
        tok = models.load_tokenizer(a.dir)
        text = a.text.read_text(encoding="utf-8") if a.text else models.wikitext2("test")
        calib = calibration_split(token_ids(tok, text), a.window, a.windows)[0]
    pool = None
    if a.ray:
        from lowbit.io.streaming.ray import RayPool
        pool = RayPool(num_cpus=a.ray)
    quantize_checkpoint(a.dir, get_recipe(a.recipe, a.method), a.out, calibration=calib, calibration_dtype="auto",
                        activation_bytes=int(a.activation_mb * 2**20), progress=False, ray=pool,
                        on_part=lambda name, s: times.append((name, s)))
    rep = reports[0] if reports else None
    print("RESULT " + json.dumps({"parts": times, "rates": rates,
                                  "phases": rep.phases if rep else None,
                                  "block_seconds": rep.block_seconds if rep else None,
                                  "tokens": rep.tokens if rep else None}))


def run(a, folder: Path, out: Path) -> None:
    from lowbit.io.streaming.source import source_tensors

    from lowbit.io.streaming.rows import stored_tensors

    where = source_tensors(folder)
    wanted = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]  # what is read
    src_bytes = 0
    for shard in sorted(set(where.values())):
        src_bytes += sum(t.dtype.itemsize * torch.Size(t.shape).numel() for k, t in stored_tensors(shard).items()
                         if k in wanted)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-P", __file__, "--child",  # -P: bench/kernels.py must not shadow the kernels package "--dir", str(folder), "--out", str(out), "--recipe", a.recipe,
           "--method", a.method, "--threads", str(a.threads), "--windows", str(a.windows), "--window", str(a.window),
           "--activation-mb", str(a.activation_mb)] + (["--text", str(a.text)] if a.text else []) + (["--ray", str(a.ray)] if a.ray else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    sys.stderr.write(proc.stderr[-3000:])
    if proc.returncode:
        raise SystemExit(f"the quantization failed (exit {proc.returncode})")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # KiB -> GiB
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    parts = result["parts"]
    print("\n".join(l for l in proc.stdout.splitlines() if not l.startswith("RESULT ")))
    blocks = [s for n, s in parts if n.startswith("model.layers.")]
    other = {n: round(s, 1) for n, s in parts if not n.startswith("model.layers.")}
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    calib = f", {a.windows} x {a.window} tokens" if a.method != "rtn" else ""
    calib += f", Ray {a.ray} workers (peak RSS: the driver only)" if a.ray else ", one process"
    print(f"\n| source | {a.recipe} {a.method}{calib} | wall s | peak RSS GiB | input GB/s | s per block "
          f"(median, min-max) | other parts s | output GB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {folder.name} ({src_bytes / 1e9:.2f} GB bf16 read) | {len(blocks)} blocks | {wall:.0f} | {peak:.2f} | "
          f"{src_bytes / wall / 1e9:.3f} | {statistics.median(blocks):.1f} ({min(blocks):.1f}-{max(blocks):.1f}) | "
          f"{other} | {out_bytes / 1e9:.2f} |")
    if result["rates"]:
        predicted_table(a, result, peak)


def predicted_table(a, result: dict, peak_gib: float) -> None:
    """Measured seconds per block against bench/gptq_flops.py's prediction at the rates the child
    measured just before its run; the 70B projection scales each measured phase by its FLOP ratio."""
    from bench.gptq_flops import BLOCKS, RUNNER_PHASE, SHAPES, block_flops, predict

    rates, phases, blocks = result["rates"], result["phases"], result["block_seconds"]
    n = len(blocks)
    shape = SHAPES[a.shape]
    tokens = result["tokens"]
    pred = predict(shape, tokens, a.window, rates)
    by_phase = {}
    for p, t in pred.items():
        by_phase[RUNNER_PHASE[p]] = by_phase.get(RUNNER_PHASE[p], 0.0) + t
    print(f"\nGEMM GFLOP/s at {a.threads} threads (measured in the run): "
          + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    print(f"\n| {a.shape} GPTQ, {a.windows} x {a.window} tokens | measured s per block | predicted s | ratio |")
    print("|---|---:|---:|---:|")
    for ph in ("statistics", "solve", "forward"):
        m = phases.get(ph, 0.0) / n
        print(f"| {ph} | {m:.1f} | {by_phase[ph]:.1f} | {m / by_phase[ph]:.2f} |")
    other = sum(v for k, v in phases.items() if k not in by_phase) / n
    print(f"| load + write + transform | {other:.1f} | - | - |")
    total = sum(pred.values())
    per_block = statistics.median(blocks)
    print(f"| **block** (median of {n}) | **{per_block:.1f}** | **{total:.1f}** | **{per_block / total:.2f}** |")
    print(f"peak RSS {peak_gib:.2f} GiB")
    # 70B: each measured phase times its FLOP ratio (same rates, same tokens)
    f8 = block_flops(shape, tokens, a.window)
    scale = {}
    for ph in ("statistics", "solve", "forward"):
        keys = [p for p in f8 if RUNNER_PHASE[p] == ph]
        t8 = sum(pred[p] for p in keys)
        t70 = sum(predict(SHAPES["70b"], tokens, a.window, rates)[p] for p in keys)
        scale[ph] = t70 / t8
    weights = sum(r * c for r, c in SHAPES["70b"].layers.values()) / sum(r * c for r, c in shape.layers.values())
    b70 = sum(phases.get(ph, 0.0) / n * scale[ph] for ph in scale) + other * weights  # I/O goes with the bytes
    print(f"70B projection ({BLOCKS['70b']} blocks of hidden 8192, ffn 28672, same tokens and rates): "
          f"{b70:.0f} s per block, {b70 * BLOCKS['70b'] / 3600:.1f} h for the blocks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="1b")
    ap.add_argument("--dir", type=Path, required=True, help="where the synthetic checkpoint is (made if absent)")
    ap.add_argument("--out", type=Path, help="output folder (default: DIR-w4g64)")
    ap.add_argument("--recipe", default="w4g64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--make-only", action="store_true", help="write the checkpoint, do not quantize it")
    ap.add_argument("--method", default="rtn", help="rtn (data-free) or gptq (calibrated on wikitext-2 test)")
    ap.add_argument("--blocks", type=int, help="quantize only the first N blocks (a view of the checkpoint)")
    ap.add_argument("--windows", type=int, default=8, help="gptq: calibration windows (default 8)")
    ap.add_argument("--window", type=int, default=256, help="gptq: tokens per window (default 256)")
    ap.add_argument("--activation-mb", type=float, default=4096,
                    help="gptq: activations held in memory per block boundary before spilling to disk")
    ap.add_argument("--ray", type=int, default=0, metavar="N", help="run the tasks on a local Ray cluster of N CPUs "
                    "(each worker --threads threads)")
    ap.add_argument("--text", type=Path, help="gptq: calibration text (default: wikitext-2 test from ../shared)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        return child(a)
    if not (a.dir / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        make(a.dir, a.shape)
        print(f"wrote {a.dir} in {time.perf_counter() - t0:.0f} s")
    if a.make_only:
        return
    folder = first_blocks(a.dir, a.blocks) if a.blocks else a.dir
    run(a, folder, a.out or a.dir.with_name(f"{a.dir.name}-{a.recipe}-{a.method}"))
    if a.blocks:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
