"""Check lowbit's GGUF files with the real engine: llama.cpp built by bench/llama_cpp.sh.

    bench/llama_cpp.sh                                   # once: builds /tmp/llama.cpp/build/bin
    python bench/gguf_check.py --recipes q8_0,q4_0       # LOWBIT_LLAMA_CPP overrides the binary folder

For each recipe: lowbit writes SmolLM2-135M as a GGUF; llama-completion (llama-cli before llama.cpp moved it behind the server build) loads it and generates; llama-quantize
turns lowbit's F32 file into the same type and every tensor's bytes must equal ours (rtn); llama-perplexity
on wikitext-2 test (n_ctx 512, --chunks N) must agree within 1% with lowbit's perplexity of the same
dequantized weights, scored the way llama-perplexity scores (each chunk's second half).
Exit status 1 when a check fails. Opt-in: CI has no llama.cpp; the always-on tests compare with gguf-py.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.core.ggml_blocks import type_by_id  # noqa: E402
from lowbit.io import load, load_model, save, wikitext2  # noqa: E402
from lowbit.io.gguf.file import parse_gguf, tensor_bytes  # noqa: E402

FTYPE_NAMES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
               "q5_0": "Q5_0", "q5_1": "Q5_1", "q2_k": "Q2_K", "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M",
               "q3_k_l": "Q3_K_L", "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M", "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M",
               "q6_k": "Q6_K", "iq4_nl": "IQ4_NL", "q3_k": "Q3_K", "q4_k": "Q4_K", "q5_k": "Q5_K"}


def bins() -> Path:
    b = Path(os.environ.get("LOWBIT_LLAMA_CPP", "/tmp/llama.cpp/build/bin"))
    if not (b / "llama-perplexity").exists():
        sys.exit(f"no llama.cpp binaries in {b}: run bench/llama_cpp.sh or set LOWBIT_LLAMA_CPP")
    return b


def run(cmd: list, timeout=1200, stdout_only=False) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout if stdout_only else p.stdout + p.stderr


def llama_ppl(b: Path, gguf: Path, text_file: Path, chunks: int, threads: int) -> float:
    out = run([b / "llama-perplexity", "-m", gguf, "-f", text_file, "-c", 512, "--chunks", chunks, "-t", threads])
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"no perplexity in llama-perplexity output:\n{out[-2000:]}")
    return float(m.group(1))


@torch.no_grad()
def lowbit_ppl(model, ids: torch.Tensor, chunks: int, n_ctx: int = 512) -> float:
    """llama-perplexity's protocol: chunk i = ids[i*n_ctx:(i+1)*n_ctx], the logits at positions
    n_ctx/2 .. n_ctx-2 score the next token (no BOS: SmolLM2's vocabulary does not add one)."""
    first, nll, count = n_ctx // 2, 0.0, 0
    for i in range(chunks):
        x = ids[i * n_ctx:(i + 1) * n_ctx][None]
        logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0].double(), dim=-1)
        target = x[0, first + 1:]
        nll -= logp[first:n_ctx - 1].gather(1, target[:, None]).sum().item()
        count += len(target)
    return math.exp(nll / count)


def same_tensors(ours: Path, theirs: Path) -> list[str]:
    """Names of tensors whose type or bytes differ between two GGUF files."""
    a, b = parse_gguf(ours), parse_gguf(theirs)
    bad = []
    for name, ta in a.tensors.items():
        tb = b.tensors.get(name)
        t = type_by_id(ta.type_id)
        if tb is None or tb.type_id != ta.type_id or t is None:
            bad.append(f"{name} ({ta.type_id} vs {tb.type_id if tb else None})")
            continue
        if not np.array_equal(tensor_bytes(a, ta, t.block_size, t.type_size),
                              tensor_bytes(b, tb, t.block_size, t.type_size)):
            bad.append(name)
    return bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="q8_0,q4_0")
    ap.add_argument("--chunks", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/lowbit-gguf-check")
    args = ap.parse_args()
    b, work = bins(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text_file = work / "wiki.test.raw"
    text = wikitext2("test")
    text_file.write_text(text, encoding="utf-8")
    model, tok = load_model("smollm2-135m")
    ids = torch.tensor(tok(text.removesuffix("\n"), add_special_tokens=False)["input_ids"])
    f32 = save(model, work / "smollm2-f32.gguf", recipe="f32", source="smollm2-135m")
    del model
    ok = True
    rows = []
    for recipe in args.recipes.split(","):
        t0 = time.time()
        ours = f32 if recipe == "f32" else save(load(f32), work / f"smollm2-{recipe}.gguf", recipe=recipe,
                                                source="smollm2-135m")
        t_save = time.time() - t0
        gen = run([b / "llama-completion", "-m", ours, "-p", "The capital of France is", "-n", 16, "-no-cnv", "--temp", 0,
                   "-t", args.threads, "--no-warmup"], stdout_only=True)  # stdout: the prompt and the generated text
        said = gen.split("The capital of France is", 1)[-1].strip().replace("\n", " ")[:60]
        mismatch = []
        if recipe != "f32":
            ref = work / f"llama-quantize-{recipe}.gguf"
            run([b / "llama-quantize", f32, ref, FTYPE_NAMES[recipe], args.threads])
            mismatch = same_tensors(ours, ref)
        p_llama = llama_ppl(b, ours, text_file, args.chunks, args.threads)
        p_ours = lowbit_ppl(load(ours), ids, args.chunks)
        diff = (p_llama / p_ours - 1) * 100
        size = ours.stat().st_size
        n_params = sum(np.prod(t.shape) for t in parse_gguf(ours).tensors.values())
        good = not mismatch and abs(diff) < 1.0 and len(said) > 0
        ok &= good
        rows.append(f"| {recipe} | {size / 1e6:.1f} | {8 * size / n_params:.2f} | {p_llama:.4f} | {p_ours:.4f} | "
                    f"{diff:+.3f}% | {'all equal' if not mismatch else f'{len(mismatch)} differ: {mismatch[:3]}'} | "
                    f"{said!r} | {t_save:.0f} s |")
        print(rows[-1], flush=True)
    print("\n| recipe | MB | bits/weight (file) | llama.cpp ppl | lowbit ppl | diff | bytes vs llama-quantize | "
          "llama-completion: 'The capital of France is' | lowbit save |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
