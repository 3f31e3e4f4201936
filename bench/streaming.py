"""Streaming quantization of a checkpoint larger than comfortable: peak memory, input GB/s, seconds
per block (lowbit/io/streaming.py).

    make   writes a synthetic Hugging Face checkpoint with the real shapes of a Llama (random bf16
           weights, N(0, 0.02), sharded 2 GB a file with an index, config.json, and SmolLM2-135M's
           tokenizer files, which the quantized folder carries over)
    run    `lowbit quantize DIR --recipe w4g64 --method rtn --out OUT` in a child process, its peak
           RSS from getrusage, wall time, source bytes / time, seconds per block (wall / parts)

    PYTHONPATH=. .venv/bin/python bench/streaming.py --shape 1b --dir /tmp/lowbit-1b    # 2.5 GB
    PYTHONPATH=. .venv/bin/python bench/streaming.py --shape 8b --dir /tmp/lowbit-8b    # 16 GB
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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


def make(folder: Path, shape: str, shard_bytes: int = 2 << 30) -> None:
    """Write the checkpoint a shard at a time (at most one shard in memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], torch_dtype="bfloat16")
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


def run(folder: Path, out: Path, recipe: str, threads: int) -> None:
    src_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    parts = json.loads((folder / "config.json").read_text())["num_hidden_layers"] + 2
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(folder), "--recipe", recipe, "--method", "rtn",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # KiB -> GiB
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"\n| source | {recipe} rtn | wall s | peak RSS GiB | input GB/s | s per block | output GB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {folder.name} ({src_bytes / 1e9:.2f} GB bf16) | {out.name} | {wall:.0f} | {peak:.2f} | "
          f"{src_bytes / wall / 1e9:.2f} | {wall / parts:.1f} | {out_bytes / 1e9:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="1b")
    ap.add_argument("--dir", type=Path, required=True, help="where the synthetic checkpoint is (made if absent)")
    ap.add_argument("--out", type=Path, help="output folder (default: DIR-w4g64)")
    ap.add_argument("--recipe", default="w4g64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--make-only", action="store_true", help="write the checkpoint, do not quantize it")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not (a.dir / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        make(a.dir, a.shape)
        print(f"wrote {a.dir} in {time.perf_counter() - t0:.0f} s")
    if a.make_only:
        return
    run(a.dir, a.out or a.dir.with_name(a.dir.name + "-" + a.recipe), a.recipe, a.threads)


if __name__ == "__main__":
    main()
