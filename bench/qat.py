"""Quantization-aware training of SmolLM2-135M: how much of round-to-nearest's loss a short run recovers.

Each run: quantize (RTN or GPTQ at w3g64 / w2g64; embeddings and lm_head stay fp32 throughout),
lowbit.qat.prepare, train the quantized Linear weights (and LSQ step sizes) on wikitext-2 *valid*
with a distillation loss KL(fp32 teacher || student) over the vocabulary, lowbit.qat.convert, and
score perplexity on wikitext-2 *test* (BOS + the text, the first N windows of 512 tokens). The
recovered share is measured on log-perplexity: (nll_quant - nll_qat) / (nll_quant - nll_fp32).

    flock /tmp/lowbit-heavy.lock nice -n 5 env PYTHONPATH=. .venv/bin/python bench/qat.py   # docs/benchmarks.md
    ... bench/qat.py --runs rtn:w3g64 --steps 20      # a quick look
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lowbit
from lowbit.eval import perplexity, token_ids
from lowbit.io import load_model, wikitext2
from lowbit.nn.fake_quant import FakeQuantLinear
from lowbit.pipeline.recipe import get_recipe

ROOT = Path(__file__).resolve().parents[1]


def wikitext(split: str) -> str:
    """wikitext-2 `split` from ../shared beside the repository, or /work/shared (a git worktree's checkout)."""
    try:
        return wikitext2(split)
    except ValueError:
        return (Path("/work/shared/data/wikitext-2") / f"{split}.txt").read_text(encoding="utf-8")


def recipe_of(name: str, method: str = "rtn"):
    return get_recipe(name).replace(embeddings=None, output=None, method=method)


def train(student, teacher, ids: torch.Tensor, args, label: str) -> tuple[list[float], float]:
    """KD steps over consecutive [batch, seq] windows of ids; returns (loss per step, seconds)."""
    weights = [m.weight for m in student.modules() if isinstance(m, FakeQuantLinear)]
    steps = [m.step for m in student.modules() if isinstance(m, FakeQuantLinear) and m.scales == "learned"]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in weights + steps:
        p.requires_grad_(True)
    groups = [{"params": weights, "lr": args.lr}] + ([{"params": steps, "lr": args.scale_lr}] if steps else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, args.steps) / args.steps)))
    n = args.batch * args.seq
    losses, t0 = [], time.perf_counter()
    student.train()
    for i in tqdm(range(args.steps), desc=f"qat {label}", unit="step"):
        start = (i * n) % (len(ids) - n)
        x = ids[start:start + n].reshape(args.batch, args.seq)
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), -1)
        s_logp = F.log_softmax(student(input_ids=x, use_cache=False).logits.float(), -1)
        loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    student.eval()
    return losses, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="rtn:w3g64,gptq:w3g64,rtn:w2g64", help="init:recipe, comma separated")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--scale-lr", type=float, default=1e-4)
    ap.add_argument("--scales", default="learned", choices=("dynamic", "frozen", "learned"))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "qat_loss.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    teacher, tok = load_model("smollm2-135m")
    teacher.eval().requires_grad_(False)
    test_ids = token_ids(tok, wikitext("test"))
    train_ids = token_ids(tok, wikitext("valid"))

    def ppl(m) -> float:
        return perplexity(m, test_ids, max_windows=args.windows, progress=False).ppl

    fp = ppl(teacher)
    print(f"fp32 ppl {fp:.3f} ({args.windows} windows of 512, wikitext-2 test)", flush=True)
    rows, curves = [], {}
    for spec in args.runs.split(","):
        init, name = spec.split(":")
        student = copy.deepcopy(teacher)
        t = time.perf_counter()
        if init == "gptq":
            calib = train_ids[-64 * 512:].reshape(64, 512)  # the end of valid; training reads from its start
            lowbit.quantize(student, recipe_of(name, "gptq"), calibration=list(calib), progress=False)
            quant_ppl = ppl(student)
            lowbit.qat.prepare(student, scales=args.scales if args.scales != "dynamic" else "frozen", progress=False)
        else:
            quant_ppl = ppl(lowbit.quantize(copy.deepcopy(teacher), recipe_of(name), progress=False))
            lowbit.qat.prepare(student, recipe_of(name), scales=args.scales, progress=False)
        init_s = time.perf_counter() - t
        losses, secs = train(student, teacher, train_ids, args, spec)
        lowbit.qat.convert(student, progress=False)
        qat_ppl = ppl(student)
        recovered = (math.log(quant_ppl) - math.log(qat_ppl)) / (math.log(quant_ppl) - math.log(fp))
        row = dict(run=spec, fp32=fp, quantized=quant_ppl, qat=qat_ppl, recovered_logppl=recovered,
                   recovered_excess=(quant_ppl - qat_ppl) / (quant_ppl - fp), steps=args.steps,
                   tokens=args.steps * args.batch * args.seq, train_s=secs, init_s=init_s,
                   loss_first=losses[0], loss_last=sum(losses[-10:]) / len(losses[-10:]))
        rows.append(row)
        curves[spec] = losses
        print(json.dumps(row), flush=True)
        del student
    print(f"\nsteps {args.steps}, batch {args.batch} x seq {args.seq}, lr {args.lr} (scales {args.scales}, "
          f"lr {args.scale_lr}), AdamW, cosine, KD loss\n")
    print("| start | ppl fp32 | ppl quantized | ppl after QAT | recovered (log-ppl) | recovered (ppl excess) | "
          "tokens | train time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['fp32']:.2f} | {r['quantized']:.2f} ({100 * (r['quantized'] / r['fp32'] - 1):+.0f}%) | "
              f"{r['qat']:.2f} ({100 * (r['qat'] / r['fp32'] - 1):+.0f}%) | {100 * r['recovered_logppl']:.0f}% | "
              f"{100 * r['recovered_excess']:.0f}% | {r['tokens']:,} | {r['train_s'] / 60:.1f} min |")
    plot(curves, args.out)


def plot(curves: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("KL(fp32 || student), nats/token")
    ax.set_yscale("log")
    ax.set_title("QAT on SmolLM2-135M (wikitext-2 valid)")
    ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"loss curve: {out}")


if __name__ == "__main__":
    main()
