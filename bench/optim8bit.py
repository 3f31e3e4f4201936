"""Training in low precision on SmolLM2-135M (issue 12): 8-bit AdamW against torch's AdamW, memory
per parameter, bf16 weights with stochastic rounding, compressed-gradient DDP on two gloo processes.

All parts fine-tune on wikitext-2 valid.txt (../shared), consecutive windows of `--seq` tokens,
`--batch` windows a step, the same windows and seed for every run they compare.

    flock /tmp/lowbit-heavy.lock nice -n 5 env PYTHONPATH=. .venv/bin/python bench/optim8bit.py parity --threads 1
    ... bench/optim8bit.py memory | steptime | sr | ddp

parity  AdamW8bit and torch.optim.AdamW(foreach=True) trained side by side, step by step (so both
        see the same machine load): losses, optimizer step times, state bytes per parameter;
        docs/img/optim8bit_loss.png (optim8bit_loss_emb32.png with --embedding-bits 32)
memory  bytes per parameter of weights, gradients and optimizer state after one real step, for
        fp32 weights + AdamW and bf16 weights + AdamW8bit (tensors counted, process RSS beside)
steptime  the optimizer step alone on the full model's parameters, the two optimizers in turn
sr      bf16 weights at a small learning rate: round-to-nearest write-back against stochastic
        rounding against fp32 weights; docs/img/optim_sr_loss.png
ddp     two gloo processes, float32 all-reduce against the int8 and fp8 hooks with error
        feedback: losses, bytes sent per step; docs/img/optim_ddp_loss.png
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lowbit.eval import token_ids
from lowbit.io import load_model, wikitext2
from lowbit.optim import AdamW8bit, keep_embeddings_32bit, state_nbytes
from lowbit.optim.stochastic import StochasticRounding

IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


DATA = None  # --data: wikitext-2 valid.txt; None reads lowbit.io.wikitext2("valid") (../shared beside the repo)


def batches(tok, seq: int, batch: int, steps: int, offset: int = 0) -> list[torch.Tensor]:
    ids = token_ids(tok, Path(DATA).read_text(encoding="utf-8") if DATA else wikitext2("valid"))
    need = (offset + steps) * batch * seq
    if need > ids.numel():
        raise ValueError(f"wikitext-2 valid has {ids.numel()} tokens, {need} needed")
    ids = ids[offset * batch * seq: need].view(steps, batch, seq)
    return list(ids)


def loss_of(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


def lr_at(step: int, lr: float, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / warmup)


def cut(model, layers: int):
    if layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model


def plot(curves: dict[str, list[float]], title: str, path: Path, ylabel: str = "training loss") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    print(f"wrote {path}")


def parity(args) -> None:
    base, tok = load_model("smollm2-135m")
    cut(base, args.layers)
    n_layers = base.config.num_hidden_layers
    data = batches(tok, args.seq, args.batch, args.steps)
    runs = {}
    for name in ("AdamW (torch, foreach)", "AdamW8bit (lowbit)"):
        torch.manual_seed(0)
        m = copy.deepcopy(base).train()
        ps = list(m.parameters())
        if name.startswith("AdamW8bit") and args.embedding_bits == 32:
            # the recipe transformers' Trainer applies to bitsandbytes' 8-bit Adam: every nn.Embedding
            # keeps 32-bit state (here the tied embedding, also the LM head: 28.3M of 134.5M parameters)
            keep_embeddings_32bit(m)
        opt = (torch.optim.AdamW(ps, lr=args.lr, weight_decay=0.01, foreach=True) if name.startswith("AdamW (")
               else AdamW8bit(ps, lr=args.lr, weight_decay=0.01))
        runs[name] = dict(model=m, opt=opt, loss=[], step_s=[])
    n_params = sum(p.numel() for p in base.parameters())
    del base
    (a, ra), (b, rb) = runs.items()
    bar = tqdm(data, desc="parity")
    for step, x in enumerate(bar):
        for r in runs.values():
            for g in r["opt"].param_groups:
                g["lr"] = lr_at(step, args.lr, args.warmup)
            loss = loss_of(r["model"], x)
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            t = time.perf_counter()
            r["opt"].step()
            r["step_s"].append(time.perf_counter() - t)
            r["loss"].append(loss.item())
        if (step + 1) % args.log_every == 0 or step == 0:  # a long run shows its curve as it goes
            bar.write(f"step {step + 1}: {ra['loss'][-1]:.4f} {rb['loss'][-1]:.4f} "
                      f"{100 * (rb['loss'][-1] - ra['loss'][-1]) / ra['loss'][-1]:+.2f}%")
    print(f"\nSmolLM2-135M{f' ({args.layers} layers)' if args.layers else ''}: {n_params:,} parameters, "
          f"{args.steps} steps of {args.batch} x {args.seq} tokens, lr {args.lr} (warm-up {args.warmup}), "
          f"weight decay 0.01, threads {torch.get_num_threads()}, 8-bit run's embedding state {args.embedding_bits}-bit")
    print("| step | " + " | ".join(runs) + " | rel. diff |\n|---:|---:|---:|---:|")
    worst = logged = 0.0
    for s in range(args.steps):
        rel = (rb["loss"][s] - ra["loss"][s]) / ra["loss"][s]
        shown = (s + 1) % args.log_every == 0 or s == 0
        if s >= args.warmup:
            worst = max(worst, abs(rel))
            logged = max(logged, abs(rel)) if shown else logged
        if shown:
            print(f"| {s + 1} | {ra['loss'][s]:.4f} | {rb['loss'][s]:.4f} | {100 * rel:+.2f}% |")
    print(f"\nlargest |rel. diff| after warm-up ({args.warmup} steps): at the logged steps {100 * logged:.2f}%, "
          f"at every step {100 * worst:.2f}%")
    for name, r in runs.items():
        times = sorted(r["step_s"][1:])  # step 1 allocates the state
        med = times[len(times) // 2]
        print(f"{name}: state {state_nbytes(r['opt']) / n_params:.3f} bytes/param, "
              f"optimizer step median {med:.3f} s, mean {sum(times) / len(times):.3f} s")
    med = {n: sorted(r["step_s"][1:])[len(r["step_s"][1:]) // 2] for n, r in runs.items()}
    print(f"step time ratio 8-bit / torch foreach (medians): {med[b] / med[a]:.2f}x")
    plot({n: r["loss"] for n, r in runs.items()},
         f"SmolLM2-135M{f' cut to {n_layers} layers' if args.layers else f' (full, {n_layers} layers)'}: {args.steps} "
         f"steps of {args.batch}x{args.seq} tokens, lr {args.lr}, warm-up {args.warmup}, 8-bit: embedding state "
         f"{args.embedding_bits}-bit",
         IMG / ("optim8bit_loss.png" if args.embedding_bits == 8 else "optim8bit_loss_emb32.png"))


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory(args) -> None:
    """Full SmolLM2-135M, real steps on 1 x seq tokens: bytes per parameter after the step, and the
    optimizer step time of the fp32 setups (median of steps 2..n, step 1 allocates the state)."""
    data = None
    setups = (("fp32 weights + torch AdamW(foreach)", torch.float32,
               lambda ps: torch.optim.AdamW(ps, lr=1e-5, foreach=True), 16, args.time_steps),
              ("fp32 weights + AdamW8bit", torch.float32, lambda ps: AdamW8bit(ps, lr=1e-5), 10, args.time_steps),
              ("bf16 weights + AdamW8bit", torch.bfloat16, lambda ps: AdamW8bit(ps, lr=1e-5), 6, 1))
    rows, times = [], {}
    for name, dtype, make, book, steps in setups:
        rss0 = _rss()
        model, tok = load_model("smollm2-135m", dtype=dtype)
        data = data or batches(tok, args.seq, 1, 1)
        opt = make(list(model.parameters()))
        step_s = []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_of(model, data[0]).backward()
            t = time.perf_counter()
            opt.step()
            step_s.append(time.perf_counter() - t)
        ps = list(model.parameters())
        n = sum(p.numel() for p in ps)
        w = sum(p.numel() * p.element_size() for p in ps) / n
        g = sum(p.grad.numel() * p.grad.element_size() for p in ps) / n
        s = state_nbytes(opt) / n
        rows.append(f"| {name} | {w:.2f} | {g:.2f} | {s:.3f} | **{w + g + s:.2f}** | {book} | "
                    f"{(_rss() - rss0) / n:.1f} |")
        if steps > 1:
            later = sorted(step_s[1:])
            times[name] = later[len(later) // 2]
        del model, opt, ps
    print(f"\nSmolLM2-135M, {n:,} parameters (tied embedding counted once), one real step on 1 x {args.seq} tokens\n")
    print("| setup | weights | gradients | optimizer state | total bytes/param | textbook | RSS growth / param |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    (a, ta), (b, tb) = times.items()
    print(f"\noptimizer step, full model, median of steps 2..{args.time_steps}: {a} {ta:.3f} s, {b} {tb:.3f} s, "
          f"ratio {tb / ta:.2f}x (threads {torch.get_num_threads()})")


def steptime(args) -> None:
    """Optimizer step alone on the full model's parameters (fp32) with fixed random gradients,
    torch.optim.AdamW(foreach=True) and AdamW8bit stepping in turn (the same machine load)."""
    model, _ = load_model("smollm2-135m")
    runs = {}
    for name in ("AdamW (torch, foreach)", "AdamW8bit (lowbit)"):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        gen = torch.Generator().manual_seed(0)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        opt = (torch.optim.AdamW(ps, lr=1e-5, foreach=True) if name.startswith("AdamW (") else AdamW8bit(ps, lr=1e-5))
        opt.step()  # allocates the state
        runs[name] = (opt, [])
    n = sum(p.numel() for p in model.parameters())
    del model
    for _ in tqdm(range(args.time_steps), desc="steps"):
        for opt, times in runs.values():
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
    print(f"\nSmolLM2-135M parameters ({n:,}, fp32), {args.time_steps} steps each, interleaved, threads "
          f"{torch.get_num_threads()}\n")
    print("| optimizer | median s | mean s | min s |\n|---|---:|---:|---:|")
    med = {}
    for name, (_, t) in runs.items():
        med[name] = sorted(t)[len(t) // 2]
        print(f"| {name} | {med[name]:.3f} | {sum(t) / len(t):.3f} | {min(t):.3f} |")
    a, b = med.values()
    print(f"\nratio 8-bit / torch foreach (medians): {b / a:.2f}x")


def sr(args) -> None:
    base, tok = load_model("smollm2-135m")
    cut(base, args.layers)
    data = batches(tok, args.seq, args.batch, args.cycle)
    data = [data[i % args.cycle] for i in range(args.steps)]  # a few batches, cycled: the loss falls fast
    curves = {}
    for name in ("fp32 weights", "bf16 weights, round-to-nearest", "bf16 weights, stochastic rounding"):
        torch.manual_seed(0)
        m = copy.deepcopy(base)
        if name.startswith("bf16"):
            m = m.to(torch.bfloat16)
        opt = torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.0)
        if name.startswith("bf16"):
            opt = StochasticRounding(opt, "nearest" if "nearest" in name else "stochastic",
                                     torch.Generator().manual_seed(0))
        losses = []
        for x in tqdm(data, desc=name):
            loss = loss_of(m, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.float().item())
        curves[name] = losses
    print(f"\nSmolLM2-135M{f' ({args.layers} layers)' if args.layers else ''}, AdamW lr {args.lr}, {args.steps} steps "
          f"of {args.batch} x {args.seq} tokens ({args.cycle} batches cycled)\n")
    print("| step | " + " | ".join(curves) + " |\n|---:|---:|---:|---:|")
    for s in range(args.steps):
        if (s + 1) % args.log_every == 0 or s == 0:
            print(f"| {s + 1} | " + " | ".join(f"{c[s]:.4f}" for c in curves.values()) + " |")
    k = max(1, args.steps // 10)
    for name, c in curves.items():
        print(f"{name}: first {k} steps mean {sum(c[:k]) / k:.4f}, last {k} mean {sum(c[-k:]) / k:.4f}")
    plot(curves, f"bf16 weights at lr {args.lr}: SmolLM2{f' {args.layers} layers' if args.layers else ''}",
         IMG / "optim_sr_loss.png")


def _ddp_worker(rank: int, args, mode: str, init: str, out: str) -> None:
    import torch.distributed as dist

    from lowbit.optim.comm_hooks import CompressionState, compressed_allreduce_hook

    global DATA
    DATA = args.data  # a spawned process does not run main()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    model, tok = load_model("smollm2-135m")
    cut(model, args.layers)
    data = batches(tok, args.seq, args.batch, 2 * args.steps)[rank::2]  # each rank its own windows
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = None
    if mode != "fp32 all-reduce":
        state = CompressionState(format=mode.split()[0])
        ddp.register_comm_hook(state, compressed_allreduce_hook)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr, weight_decay=0.0)
    losses, t0 = [], time.perf_counter()
    for step, x in enumerate(data):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup)
        loss = loss_of(ddp, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / 2)
    n = sum(p.numel() for p in model.parameters())
    sent = state.bytes_per_step if state else 4 * n
    if rank == 0:
        torch.save(dict(losses=losses, bytes=sent, n=n, s=(time.perf_counter() - t0) / len(data)), out)
    dist.barrier()
    dist.destroy_process_group()


def ddp(args) -> None:
    import torch.multiprocessing as mp

    curves, rows = {}, []
    for mode in ("fp32 all-reduce", "int8 + error feedback", "fp8_e4m3 + error feedback"):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.pt")
            print(f"running {mode} ...", flush=True)
            mp.spawn(_ddp_worker, args=(args, mode, os.path.join(tmp, "init"), out), nprocs=2, join=True)
            r = torch.load(out)
        curves[mode] = r["losses"]
        rows.append((mode, r))
    print(f"\nSmolLM2-135M{f' ({args.layers} layers)' if args.layers else ''}, 2 gloo processes x 1 thread, "
          f"AdamW lr {args.lr}, {args.steps} steps of 2 x {args.batch} x {args.seq} tokens\n")
    print("| gradients | bytes sent / rank / step | vs fp32 | s / step | mean loss, last 10 steps | vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    ref = sum(rows[0][1]["losses"][-10:]) / 10
    for mode, r in rows:
        last = sum(r["losses"][-10:]) / 10
        print(f"| {mode} | {r['bytes']:,} | {r['bytes'] / rows[0][1]['bytes']:.3f} | {r['s']:.2f} | {last:.4f} | "
              f"{100 * (last - ref) / ref:+.2f}% |")
    plot(curves, f"DDP on 2 gloo processes, SmolLM2{f' {args.layers} layers' if args.layers else ''}",
         IMG / "optim_ddp_loss.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=("parity", "memory", "steptime", "sr", "ddp"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (0: all)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--cycle", type=int, default=8, help="sr: distinct batches, cycled")
    ap.add_argument("--time-steps", type=int, default=6, help="memory: optimizer steps timed per fp32 setup")
    ap.add_argument("--data", default=None, help="wikitext-2 valid.txt (default: ../shared beside the repo)")
    ap.add_argument("--embedding-bits", type=int, choices=(8, 32), default=8,
                    help="parity: optimizer state bits of the 8-bit run's embeddings (32: transformers' recipe)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global DATA
    DATA = args.data
    if args.lr is None:
        args.lr = {"parity": 1e-4, "memory": 1e-5, "steptime": 1e-5, "sr": 3e-5, "ddp": 1e-4}[args.part]
    globals()[args.part](args)


if __name__ == "__main__":
    main()
