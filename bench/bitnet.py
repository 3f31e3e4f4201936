"""Post-training collapse of SmolLM2-135M under extreme low-bit weights: binary, ternary, BitNet b1.58.

Every Linear of the decoder blocks is quantized from the fp32 model with no calibration and no
training (embeddings and the output layer stay fp32, as in BitNet): `binary` (XNOR-Net: sign(W)
times mean |W| per output channel, 1 bit), `ternary` ({-1, 0, 1} times mean |W| per channel,
2-bit codes), `bitnet` (BitNet b1.58: per-tensor absmean ternary weights, int8 activations per
token, nn.BitLinear), with `w2g64` (2-bit affine groups of 64, round to nearest) and `w4g64` as
references. Perplexity over the first `--windows` windows of 512 tokens of wikitext-2 test (the
reference protocol's opening windows), fp32 measured in the same run; bits per weight of the
quantized Linear layers counted from their stored bytes.

Then a short quantization-aware recovery (`--qat-steps`, 0 to skip): BitNet's forward with a
straight-through estimator (absmean ternary weights and int8 activations in the forward, identity
gradients to the latent fp32 weights), AdamW on random 128-token windows of wikitext-2 *valid*,
starting from the fp32 model; the trained latent weights are then quantized by the real `bitnet`
recipe (packed BitLinear) and scored on the same test windows. The loss curve goes to `--png`.

    PYTHONPATH=. .venv/bin/python bench/bitnet.py --windows 8 [--text /work/shared/data/wikitext-2/test.txt]
"""
from __future__ import annotations

import argparse
import copy

import random
import time

import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.eval.perplexity import perplexity, token_ids
from lowbit.io import load_model
from lowbit.io.models import wikitext2
from lowbit.nn import QuantLinear

RECIPES = ("binary", "ternary", "bitnet", "w2g64", "w4g64")


class STEBitLinear(nn.Module):
    """BitNet b1.58's forward on a Linear's latent weights, straight-through gradients (training only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        w = self.linear.weight
        gamma = w.abs().mean().clamp(min=1e-8)
        wq = (w / gamma).round().clamp(-1, 1) * gamma
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
        xq = (x / s).round().clamp(-127, 127) * s
        return F.linear(x + (xq - x).detach(), w + (wq - w).detach(), self.linear.bias)


def swap_linears(model, wrap: bool) -> None:
    """Decoder-block Linears <-> STEBitLinear wrappers (the embeddings and the head stay fp32)."""
    for block in model.model.layers:
        for name, m in list(block.named_modules()):
            if (wrap and isinstance(m, nn.Linear)) or (not wrap and isinstance(m, STEBitLinear)):
                parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
                setattr(parent, name.rpartition(".")[2], STEBitLinear(m) if wrap else m.linear)


def qat(model, train_ids: torch.Tensor, steps: int, lr: float, batch: int, seq: int) -> list[float]:
    swap_linears(model, wrap=True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng, losses = random.Random(0), []
    for step in range(steps):
        starts = [rng.randrange(0, train_ids.numel() - seq - 1) for _ in range(batch)]
        x = torch.stack([train_ids[s:s + seq] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"  step {step + 1}/{steps}: loss {losses[-1]:.3f}", flush=True)
    model.eval()
    swap_linears(model, wrap=False)
    return losses


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text", default=None, help="wikitext-2 test.txt (default: ../shared beside the repo)")
    p.add_argument("--qat-steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--png", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    text = open(args.text, encoding="utf-8").read() if args.text else wikitext2("test")
    ids = token_ids(tok, text)
    base = perplexity(model, ids, max_windows=args.windows, progress=False).ppl
    print(f"SmolLM2-135M, {args.windows} x 512 tokens of wikitext-2 test, {args.threads} threads")
    print("| recipe | bits/weight (Linear) | ppl | x fp32 |\n|---|---|---|---|")
    print(f"| fp32 | 32 | {base:.2f} | 1.00 |", flush=True)
    for name in RECIPES:
        q = copy.deepcopy(model)
        lowbit.quantize(q, name, progress=False)
        layers = [m for m in q.model.layers.modules() if isinstance(m, QuantLinear)]
        bpw = 8 * sum(m.qweight.nbytes for m in layers) / sum(m.qweight.numel for m in layers)
        ppl = perplexity(q, ids, max_windows=args.windows, progress=False).ppl
        print(f"| {name} | {bpw:.3f} | {ppl:,.1f} | {ppl / base:,.1f} |", flush=True)
        del q
    if args.qat_steps:
        valid = (args.text.replace("test.txt", "valid.txt") if args.text else None)
        train_ids = token_ids(tok, open(valid, encoding="utf-8").read() if valid else wikitext2("valid"))
        q = copy.deepcopy(model)
        t0 = time.perf_counter()
        losses = qat(q, train_ids, args.qat_steps, args.lr, args.batch, args.seq)
        lowbit.quantize(q, "bitnet", progress=False)
        ppl = perplexity(q, ids, max_windows=args.windows, progress=False).ppl
        print(f"| bitnet after {args.qat_steps} STE steps ({args.batch} x {args.seq} tokens, lr {args.lr:g}, "
              f"{time.perf_counter() - t0:.0f} s) | 2.000 | {ppl:,.1f} | {ppl / base:,.1f} |", flush=True)
        if args.png:
            from lowbit.analysis.plots import atomic_png, pyplot
            fig, ax = pyplot().subplots(figsize=(6, 3.5))
            ax.plot(range(1, len(losses) + 1), losses)
            ax.set_xlabel("step"); ax.set_ylabel("training loss (BitNet forward, STE)")
            ax.set_title("SmolLM2-135M -> BitNet b1.58, quantization-aware recovery")
            atomic_png(fig, args.png)


if __name__ == "__main__":
    main()
