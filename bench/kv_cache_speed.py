"""Decode speed at long context: bf16 DynamicCache against lowbit's quantized KV cache read two
ways, the dequantize path (sdpa over the whole prefix dequantized at every step, as before) and
the codes path (`lowbit.nn.use_kv_attention`: scores and sums straight from the packed codes).

Every setting starts from the same `--context` tokens of K/V per layer: for smollm2-135m, one
prefill of random token ids through a DynamicCache in the run's dtype, whose K/V are then fed to
each cache as a prefill would feed them (one update per layer with all tokens); for llama-1b (the
1B Llama shape of bench/decode_1b.py, random weights), random N(0, 1) K/V (decode speed does not
depend on the values, and a 4k prefill of 1B parameters takes minutes on 2 cores). Then
`--warmup` untimed and `--steps` timed greedy one-token steps, `--rounds` times per setting with
the settings interleaved; the table gives the best round's tok/s, the ratio to
the bf16 cache, and the bytes the cache holds after the steps (DynamicCache: its keys and values;
lowbit: cache.nbytes(), codes + scales + zeros + full-precision residual window).

    PYTHONPATH=. python bench/kv_cache_speed.py                          # smollm2-135m, 4096, int4
    PYTHONPATH=. python bench/kv_cache_speed.py --model llama-1b --formats int4,int8
    PYTHONPATH=. python bench/kv_cache_speed.py --threads 1 --clock cpu   # busy machine: CPU time per token
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers.cache_utils import DynamicCache

import lowbit
from lowbit.nn import cache_keyword, use_kv_attention

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# wall: elapsed time; cpu (with --threads 1): the calling thread's CPU time, the work per token, which
# other processes on a busy machine do not change. Not process time: OpenMP workers (numba's, torch's)
# spin between parallel regions and would be counted.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def llama_1b(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=49152, max_position_embeddings=8192,
                      tie_word_embeddings=True, initializer_range=0.02)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def load(name: str, dtype: torch.dtype) -> torch.nn.Module:
    if name == "llama-1b":
        return llama_1b(dtype)
    model, _ = lowbit.io.load_model(name)
    return model.to(dtype).eval()


@torch.no_grad()
def source_kv(model, context: int, random_kv: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) [1, H, context, D] in the model's dtype."""
    cfg = model.config
    H, D = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    if random_kv:
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(1, H, context, D, generator=g).to(dtype), torch.randn(1, H, context, D, generator=g).to(dtype))
                for _ in range(cfg.num_hidden_layers)]
    ids = torch.randint(0, cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    model.set_attn_implementation("sdpa")
    model(ids, **{cache_keyword(model): cache}, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def filled(cache, kv):
    for i, (k, v) in enumerate(kv):
        cache.update(k.clone(), v.clone(), i)
    return cache


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def decode(model, cache, steps: int, warmup: int, clock=time.perf_counter) -> float:
    """tok/s over `steps` greedy one-token steps after `warmup` untimed ones."""
    tok = torch.tensor([[1]])
    kw = {cache_keyword(model): cache, "use_cache": True}
    for _ in range(warmup):
        tok = model(tok, **kw).logits[:, -1:].argmax(-1)
    t0 = clock()
    for _ in range(steps):
        tok = model(tok, **kw).logits[:, -1:].argmax(-1)
    return steps / (clock() - t0)


def settings(args):
    """(name, make cache, attention) for each row."""
    rows = [(f"{args.dtype} DynamicCache (sdpa)", DynamicCache, "sdpa")]  # the first row is the baseline
    for fmt in args.formats.split(","):
        def make(fmt=fmt):
            return lowbit.kv_cache(fmt, group_size=args.group, residual_length=args.residual, keys=args.keys)
        rows.append((f"lowbit {fmt}, dequantize path (sdpa)", make, "sdpa"))
        rows.append((f"lowbit {fmt}, codes path (lowbit_kv)", make, "lowbit_kv"))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "llama-1b"])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="each setting this many times, interleaved; best kept")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", default="wall", choices=list(CLOCKS))
    p.add_argument("--formats", default="int4", help="comma list of lowbit.kv_cache formats")
    p.add_argument("--keys", default="channel", choices=["channel", "token"])
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--residual", type=int, default=128)
    args = p.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        raise ValueError(f"--clock cpu counts the calling thread only: run it with --threads 1 (got {args.threads})")
    torch.set_num_threads(args.threads)
    model = load(args.model, DTYPES[args.dtype])
    kv = source_kv(model, args.context, random_kv=args.model == "llama-1b")
    print(f"{args.model} {args.dtype}, context {args.context}, {args.steps} timed decode steps, {args.threads} threads, "
          f"keys per {args.keys}, group {args.group}, residual {args.residual}, {args.clock} clock")
    rows = settings(args)
    best, held = {}, {}
    for i in range(args.rounds):  # settings interleaved, best of the rounds: a busy machine slows some steps
        for name, make, attn in rows:
            if attn == "sdpa":
                model.set_attn_implementation("sdpa")
            else:
                use_kv_attention(model)
            cache = filled(make(), kv)
            rate = decode(model, cache, args.steps, args.warmup, CLOCKS[args.clock])
            best[name], held[name] = max(rate, best.get(name, 0.0)), cache_bytes(cache)
            print(f"round {i + 1}: {name}: {rate:.2f} tok/s", flush=True)
    print("| cache | attention | decode tok/s | vs bf16 cache | cache MiB |\n|---|---|---|---|---|")
    base = best[rows[0][0]]
    for name, _, _ in rows:
        label, how = name.rsplit(" (", 1)
        print(f"| {label} | {how[:-1]} | {best[name]:.2f} | {best[name] / base:.2f}x | {held[name] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
