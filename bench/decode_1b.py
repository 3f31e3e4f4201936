"""Greedy decode of a 1B-parameter Llama-shaped model with random weights: PyTorch eager
(fp32, bf16, lowbit RTN recipes with fp32 and with bf16 activations) against llama.cpp
(Q4_0, Q8_0 of the same weights, written by lowbit's GGUF writer), same thread count.

The model: transformers LlamaConfig, hidden 2048, 16 layers, intermediate 8192, 32 heads,
8 KV heads, vocab 49152 (SmolLM2's tokenizer, which the GGUF files carry), tied embeddings,
weights N(0, 0.02) from a fixed seed: 1.07B parameters, about 4.3 GB in fp32.

Each row: decode tok/s (one [1, 1] step after another with the KV cache, after a prompt of
--prompt-tokens and a warm-up run), the ratio to bf16 PyTorch, prefill tok/s (one forward over
--prefill-tokens), and the achieved bandwidth of the decode steps:
weight bytes a step reads (every linear layer's weight incl. the output layer; the embedding
row is left out) / time per token, against a 256 MiB copy measured in the same run.

    PYTHONPATH=. .venv/bin/python bench/decode_1b.py                       # 2 threads, wall clock
    PYTHONPATH=. .venv/bin/python bench/decode_1b.py --threads 1 --clock cpu   # busy machine
    PYTHONPATH=. .venv/bin/python bench/decode_1b.py --model smollm2-135m      # the same rows for SmolLM2
    LOWBIT_LLAMA_CPP=/tmp/llama.cpp/build/bin ...                          # where llama-bench is

--clock cpu (with --threads 1): PyTorch rows count the calling thread's CPU time; llama.cpp rows
count llama-bench's CPU time (getrusage of the child) of a 48-token run minus a 16-token run,
so loading and warm-up cancel.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.eval.speed import _cache_name
from lowbit.kernels import qmatmul
from lowbit.nn import QuantLinear

MODELS = "fp32,bf16,w8,w4g64,nf4,w8@bf16,w4g64@bf16,nf4@bf16,w4g64@int8"
CLOCK = time.perf_counter


def random_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=49152, max_position_embeddings=2048,
                      tie_word_embeddings=True, initializer_range=0.02)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # transformers' init may skip or vary by version: set every weight here
        g = torch.Generator().manual_seed(seed)
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "norm" in n:
                p.fill_(1.0)
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the linear layers' weights (what one decode step reads), output layer included."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            n += m.qweight.nbytes
        elif isinstance(m, torch.nn.Linear):
            n += m.weight.nbytes
    return n


def build(base: torch.nn.Module, kind: str) -> torch.nn.Module:
    """fp32 (the base itself), bf16, a recipe name, or recipe@bf16 (quantized, then .to(bf16):
    the codes stay as stored, activations are bf16), recipe@int8 (fp32 model, int8 activations
    everywhere: LOWBIT_ACTIVATIONS=int8), recipe@bf16+int8 (bf16 model, int8 everywhere) or
    recipe@bf16+float (bf16 model, activations never int8: the dequantize route)."""
    if kind == "fp32":
        return base
    if kind == "bf16":
        return copy.deepcopy(base).to(torch.bfloat16)
    recipe, _, act = kind.partition("@")
    q = lowbit.quantize(copy.deepcopy(base), recipe, progress=False)
    return q.to(torch.bfloat16) if "bf16" in act else q


@torch.inference_mode()
def decode_speed(model, prompt_tokens: int, new_tokens: int, runs: int) -> float:
    """Decode tok/s: the best of `runs` runs of new_tokens steps after a prompt, after a warm-up run."""
    key = _cache_name(model)  # the KV-cache argument's name in this transformers
    best = float("inf")
    for i in range(runs + 1):
        out = model(input_ids=_prompt(model, prompt_tokens), use_cache=True)
        cache, nxt = getattr(out, key), out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = CLOCK()
        for _ in range(new_tokens if i else 2):
            out = model(input_ids=nxt, use_cache=True, **{key: cache})
            cache, nxt = getattr(out, key), out.logits[:, -1].argmax(-1, keepdim=True)
        if i:
            best = min(best, (CLOCK() - t0) / new_tokens)
    return 1 / best


@torch.inference_mode()
def prefill_speed(model, tokens: int, runs: int) -> float:
    """Prefill tok/s: one forward over a prompt of `tokens`, the best of `runs` after a warm-up."""
    prompt = _prompt(model, tokens)
    best = float("inf")
    for i in range(runs + 1):
        t0 = CLOCK()
        model(input_ids=prompt, use_cache=True)
        if i:
            best = min(best, CLOCK() - t0)
    return tokens / best


def _prompt(model, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)


def copy_bandwidth() -> float:
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t0 = CLOCK()
        dst.copy_(src)
        best = min(best, CLOCK() - t0)
    return src.nbytes / best / 1e9


def gguf_weight_bytes(path: Path) -> int:
    import gguf

    r = gguf.GGUFReader(str(path))
    names = {t.name for t in r.tensors}
    tied = "output.weight" not in names
    return sum(int(t.n_bytes) for t in r.tensors
               if len(t.shape) >= 2 and (t.name != "token_embd.weight" or tied))


def llama_bench(bin_dir: Path, path: Path, threads: int, new_tokens: int, cpu_clock: bool) -> float:
    """llama.cpp tg tok/s (llama-bench -p 0 -n N -t threads)."""
    exe = str(bin_dir / "llama-bench")

    def run(n: int, reps: int) -> tuple[dict, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([exe, "-m", str(path), "-p", "0", "-n", str(n), "-t", str(threads), "-r", str(reps),
                              "-o", "json"], check=True, capture_output=True, text=True).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return json.loads(out)[0], cpu

    if not cpu_clock:
        return run(new_tokens, 3)[0]["avg_ts"]
    _, short = run(16, 1)
    _, long = run(48, 1)
    return 32 / (long - short)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1b", help="1b (random weights, above) or a lowbit built-in, e.g. smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--models", default=MODELS,
                    help="fp32, bf16, recipe names, recipe@bf16 (bf16 activations), recipe@int8 (int8 activations), "
                    "recipe@bf16+int8 (bf16 model, int8 activations), recipe@bf16+float (no int8)")
    ap.add_argument("--gguf", default="q4_0,q8_0", help="llama.cpp types to write and run ('' for none)")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="context before the timed decode steps")
    ap.add_argument("--prefill-tokens", type=int, default=128, help="prompt length of the prefill timing (0: skip)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2, help="timed decode runs per model (best counts)")
    ap.add_argument("--llama-cpp", default=os.environ.get("LOWBIT_LLAMA_CPP", "/tmp/llama.cpp/build/bin"))
    a = ap.parse_args()
    if a.clock == "cpu" and a.threads != 1:
        ap.error("--clock cpu counts only the calling thread: use it with --threads 1")
    global CLOCK
    CLOCK = time.thread_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    print(f"clock {a.clock}, threads {a.threads}, backend: {qmatmul.backend()}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    if a.model == "1b":
        base = random_llama()
    else:  # a lowbit built-in model, loaded in fp32
        from lowbit.io import load_model

        base = load_model(a.model)[0].eval()  # fp32 (dequantized from its GGUF file)
    copy_gbs = copy_bandwidth()
    print(f"copy: {copy_gbs:.1f} GB/s read; {sum(p.numel() for p in base.parameters()) / 1e9:.2f}B parameters\n")
    title = "1B Llama, random weights" if a.model == "1b" else a.model
    print(f"| {title} | decode tok/s | vs bf16 | weight MB/token | GB/s | of copy | "
          f"prefill tok/s ({a.prefill_tokens}) |")
    print("|---|---|---|---|---|---|---|")
    bf16 = None

    def row(name, tps, nbytes, prefill="-"):
        nonlocal bf16
        bf16 = tps if name == "bf16 (torch)" else bf16
        gbs = nbytes * tps / 1e9
        ratio = f"{tps / bf16:.2f}" if bf16 else "-"
        print(f"| {name} | {tps:.2f} | {ratio} | {nbytes / 1e6:.0f} | {gbs:.1f} | {gbs / copy_gbs:.2f} | {prefill} |",
              flush=True)

    for kind in a.models.split(","):
        m = build(base, kind)
        mode = "int8" if kind.endswith("int8") else "float" if kind.endswith("float") else "auto"
        with qmatmul.activations(mode):  # decode and prefill alike
            tps = decode_speed(m, a.prompt_tokens, a.new_tokens, a.runs)
            pps = prefill_speed(m, a.prefill_tokens, a.runs) if a.prefill_tokens else float("nan")
        name = kind if "@" in kind or kind not in ("fp32", "bf16") else f"{kind} (torch)"
        name = name.replace("@bf16+int8", " (bf16 model, int8 act, opt-in)").replace("@bf16+float", " (bf16, float act)")
        row(name.replace("@bf16", " (bf16 act)").replace("@int8", " (int8 act, opt-in)"), tps, weight_bytes(m), f"{pps:.0f}")
        if m is not base:
            del m
            gc.collect()
    if a.gguf:
        bin_dir = Path(a.llama_cpp)
        with tempfile.TemporaryDirectory(prefix="lowbit-1b-") as d:
            for ft in a.gguf.split(","):
                path = Path(d) / f"llama1b-{ft}.gguf"
                lowbit.save(base, path, recipe=ft, source="smollm2-135m")
                tps = llama_bench(bin_dir, path, a.threads, a.new_tokens, a.clock == "cpu")
                row(f"llama.cpp {ft.upper()}", tps, gguf_weight_bytes(path))
                path.unlink()


if __name__ == "__main__":
    main()
