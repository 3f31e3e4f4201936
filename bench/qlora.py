"""QLoRA on SmolLM2-135M: perplexity before/after fine-tuning, and peak memory against LoRA over bf16
and full fine-tuning, each configuration in a fresh process of the same run.

    qlora      lowbit nf4-dq base (frozen) + peft LoRA (fp32 adapters), lowbit.nn.lora.register
    qlora-bf16-ckpt  the same nf4-dq codes computing in bf16 (`model.to(torch.bfloat16)`: the layers
               dequantize to bf16 in forward and backward), fp32 adapters (peft's autocast_adapter_dtype),
               gradient checkpointing on: QLoRA as it is meant to run
    lora-bf16  the model cast to bf16 (frozen) + peft LoRA (fp32 adapters: peft's autocast_adapter_dtype)
    full       every fp32 weight trained (AdamW)

Data: wikitext-2 *valid* for training ([batch, seq] windows in order), perplexity on wikitext-2 *test*
(BOS + the text, the first N windows of 512). Memory: the process's resident set (RSS, /proc/self/statm)
sampled every 2 ms during the training steps; "peak" is the highest sample, "setup" the RSS just
before the first step (model, adapters, optimizer not yet stepped), after glibc's malloc_trim hands
back what loading the fp32 checkpoint and quantizing it freed.

    flock /tmp/lowbit-heavy.lock nice -n 5 env PYTHONPATH=. .venv/bin/python bench/qlora.py   # docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing as mp
import os
import queue
import threading
import time
from pathlib import Path

import torch

GiB = 1 << 30
CONFIGS = ("qlora", "qlora-bf16-ckpt", "lora-bf16", "full")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def wikitext(split: str) -> str:
    """wikitext-2 `split` from ../shared beside the repository, or /work/shared (a git worktree's checkout)."""
    try:
        from lowbit.io import wikitext2
        return wikitext2(split)
    except ValueError:
        return (Path("/work/shared/data/wikitext-2") / f"{split}.txt").read_text(encoding="utf-8")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest RSS seen by a sampling thread while the block runs."""

    def __enter__(self):
        self.peak, self._stop = rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())


def run(config: str, args, out: mp.Queue) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import lowbit
    from lowbit.eval import perplexity, token_ids
    from lowbit.io import load_model

    model, tok = load_model("smollm2-135m")
    test_ids, train_ids = token_ids(tok, wikitext("test")), token_ids(tok, wikitext("valid"))
    if config == "full":
        params, lr = list(model.parameters()), args.full_lr
    else:
        from peft import LoraConfig, get_peft_model

        from lowbit.nn.lora import register
        quantized = config.startswith("qlora")
        if quantized:
            lowbit.quantize(model, "nf4-dq", progress=False)
        if config != "qlora":
            model = model.to(torch.bfloat16)
        cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
        model = get_peft_model(model, register(cfg) if quantized else cfg)
        params, lr = [p for p in model.parameters() if p.requires_grad], args.lora_lr
    checkpointing = args.checkpointing or config.endswith("-ckpt")
    if checkpointing:
        # transformers 5.2x renamed it activation_checkpointing_enable (the old name warns)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()

    def ppl() -> float:
        return perplexity(model, test_ids, max_windows=args.windows, progress=False).ppl

    model.eval()
    before = ppl()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = args.batch * args.seq
    losses = []
    model.train()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what loading and quantizing freed, in every configuration
    setup = rss()
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        for i in range(args.steps):
            x = train_ids[i * n:(i + 1) * n].reshape(args.batch, args.seq)
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    secs = time.perf_counter() - t0
    model.eval()
    out.put(dict(config=config, checkpointing=checkpointing, adapter_dtype=str(params[0].dtype).removeprefix("torch."),
                 ppl_before=before, ppl_after=ppl(), setup_gib=setup / GiB, peak_gib=peak.peak / GiB,
                 train_s=secs, steps=args.steps, tokens=args.steps * n, lr=lr,
                 trainable=sum(p.numel() for p in params), loss_first=losses[0], loss_last=losses[-1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--full-lr", type=float, default=2e-5)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")  # a fresh process per configuration: its own peak
    rows = []
    for config in args.configs.split(","):
        q = ctx.Queue()
        p = ctx.Process(target=run, args=(config, args, q))
        p.start()
        row = None
        while row is None:
            try:
                row = q.get(timeout=5)
            except queue.Empty:
                if not p.is_alive():
                    raise RuntimeError(f"configuration {config!r} failed (exit code {p.exitcode}); see above")
        p.join()
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = {r["config"]: r for r in rows}.get("full")
    print(f"\n{args.steps} steps x {args.batch} x {args.seq} tokens, AdamW, threads {args.threads}\n")
    print("| configuration | checkpointing | adapters | trainable | ppl before | ppl after | RSS at setup | "
          "peak RSS training | peak vs full | train time |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base else "-"
        print(f"| {r['config']} | {'on' if r['checkpointing'] else 'off'} | {r['adapter_dtype']} | "
              f"{r['trainable']:,} | {r['ppl_before']:.2f} | {r['ppl_after']:.2f} | "
              f"{r['setup_gib']:.2f} GiB | {r['peak_gib']:.2f} GiB | {ratio} | {r['train_s']:.0f} s |")


if __name__ == "__main__":
    main()
