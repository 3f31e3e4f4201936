"""How low can the bits go: SmolLM2-135M perplexity against size, one best-known method per width.

Every Linear of the decoder blocks is quantized at the width of the row; the embedding table and
the tied output layer stay fp32 in every row (as BitNet keeps them), so the x axis is the decoder
Linear layers' stored bits per weight (codes + scales + zero points) and their size in MB.
Methods: 8 bits round to nearest (per-channel int8, already lossless); 6..2 bits AWQ scales then
GPTQ (`awq+gptq`, the measured best below 8 bits) on affine uint groups of 64 with fp16 scales and
zeros; 1.58 bits ternary {-1, 0, 1} x mean|W| per channel, round to nearest and through GPTQ on
the same grid, and BitNet b1.58 (per-tensor absmean, int8 activations); 1 bit binary sign(W) x
mean|W| per channel, round to nearest and through GPTQ. Calibrated rows use `--calibration`
random windows of 512 tokens of wikitext-2 *valid* (seed 0). Perplexity over the first
`--windows` windows of 512 tokens of wikitext-2 test (the protocol of bench/bitnet.py, whose fp32
is measured again here). Rows are appended to `--json` as they finish; `--plot-only` redraws.

    PYTHONPATH=. python bench/bits_sweep.py --windows 8 --calibration 16 --threads 1 \
        --text ../shared/data/wikitext-2/test.txt --json /tmp/t14/sweep.json --png docs/img/bits_sweep.png
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from lowbit.core import PerChannel, PerGroup, PerTensor, PerToken, Scheme
from lowbit.eval import linear_bits_per_weight, model_size, perplexity, token_ids
from lowbit.io import load_model
from lowbit.methods import method_needs
from lowbit.nn import QuantLinear
from lowbit.pipeline import Recipe, quantize


def affine(bits: int, group: int = 64) -> Scheme:
    # integer zero points at 4+ bits (the library's 4-bit convention), float zeros below (recipe.py)
    return Scheme(f"uint{bits}", PerGroup(group), symmetric=False, range="minmax", scale_format="fp16",
                  integer_zero=bits >= 4)


# (label, nominal bits, recipe)
ROWS = [
    ("int8 per channel, rtn", 8, Recipe(Scheme("int8", PerChannel(0), scale_format="fp32"), name="w8")),
    *[(f"uint{b} g64, awq+gptq", b, Recipe(affine(b), method="awq+gptq", name=f"w{b}g64")) for b in (6, 5, 4, 3, 2)],
    ("ternary per channel, rtn", 1.58, Recipe(Scheme("ternary", PerChannel(0), range="absmean"), name="ternary")),
    ("ternary per channel, gptq", 1.58,
     Recipe(Scheme("ternary", PerChannel(0), range="absmean"), method="gptq", name="ternary")),
    ("bitnet b1.58 (post-training)", 1.58, Recipe(Scheme("ternary", PerTensor(), range="absmean"),
                                                  activations=Scheme("int8", PerToken()), name="bitnet")),
    ("binary per channel, rtn", 1, Recipe(Scheme("binary", PerChannel(0), range="absmean"), name="binary")),
    ("binary per channel, gptq", 1,
     Recipe(Scheme("binary", PerChannel(0), range="absmean"), method="gptq", name="binary")),
]


def calibration(tok, text: str, n: int, window: int = 512, seed: int = 0) -> list[torch.Tensor]:
    ids = token_ids(tok, text)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - window, (n,), generator=g).tolist()
    return [ids[s:s + window][None] for s in starts]


def linear_mb(model) -> float:
    layers = [m for m in model.model.layers.modules() if isinstance(m, QuantLinear)]
    if layers:
        return sum(m.qweight.nbytes for m in layers) / 1e6
    return sum(m.weight.numel() * 4 for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)) / 1e6


def disk_bits(model) -> float:
    """Bits per weight of the decoder Linear layers as lowbit.save writes them (ternary codes 5 per
    byte in TQ1_0's layout, core/trits.py; everything else as held in memory)."""
    from lowbit.core.trits import tq1_nbytes
    layers = [m.qweight for m in model.model.layers.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return 32.0
    total = sum(q.nbytes - (q.codes.numel() - tq1_nbytes(q.numel) if q.scheme.format == "ternary" else 0)
                for q in layers)
    return 8.0 * total / sum(q.numel for q in layers)


def plot(rows: list[dict], path: str) -> None:
    from lowbit.analysis.plots import atomic_png, pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    base = next(r for r in rows if r["label"] == "fp32")
    ax.axhline(base["ppl"], color="grey", ls=":", lw=1, label=f"fp32 ({base['ppl']:.2f})")
    X = lambda r: r.get("disk_bits", r["bits_per_weight"])  # noqa: E731  as saved (ternary: 5 trits per byte)
    trained = [r for r in rows if "trained" in r["label"]]  # QAT / STE rows: training, not post-training
    best: dict[float, dict] = {}
    for r in rows:
        if r["label"] != "fp32" and r not in trained and (r["nominal"] not in best or r["ppl"] < best[r["nominal"]]["ppl"]):
            best[r["nominal"]] = r
    xs = sorted(best)
    ax.plot([X(best[x]) for x in xs], [best[x]["ppl"] for x in xs], "-o", color="C0",
            label="post-training, best method at each width")
    for x in xs:
        r = best[x]
        method = (r["label"].split(",") + [""])[1].split("(")[0].strip()
        ax.annotate(f"{x:g} b: {method}", (X(r), r["ppl"]), textcoords="offset points",
                    xytext=(-10, -12) if x == max(xs) else (4, 4), fontsize=7)
    if trained:
        ax.scatter([X(r) for r in trained], [r["ppl"] for r in trained], marker="s", color="C2", zorder=3,
                   label="with a short training run (QAT, BitNet STE, Deep Compression)")
        for r in trained:
            ax.annotate(r["label"].split("(")[0].split(",")[-1].strip(), (X(r), r["ppl"]), textcoords="offset points",
                        xytext=(-150, 4) if "Deep" in r["label"] else (4, -10), fontsize=6, color="C2")
    others = [r for r in rows if r["label"] != "fp32" and r not in trained and best[r["nominal"]] is not r]
    ax.scatter([X(r) for r in others], [r["ppl"] for r in others], marker="x", color="C3",
               label="other post-training methods at that width", zorder=3)
    ax.set_xscale("log"); ax.set_yscale("log")
    ticks = [1, 1.58, 2, 3, 4, 5, 6, 8]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks]); ax.minorticks_off()
    ax.set_xlabel("bits per weight of the decoder Linear layers as saved (codes + scales + zeros); "
                  f"fp32 = 32 ({base['linear_mb']:.0f} MB)", fontsize=8)
    ax.set_ylabel(f"perplexity (wikitext-2 test, {base['windows']} x 512 tokens)")
    ax.set_title("SmolLM2-135M: how low can the bits go")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    atomic_png(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--calibration", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text", default=None, help="wikitext-2 test.txt (valid.txt beside it is the calibration)")
    p.add_argument("--json", default="bits_sweep.json")
    p.add_argument("--png", default=None)
    p.add_argument("--only", default=None, help="';'-separated prefixes of the row labels to run")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--reuse", action="append", default=[],
                   help="a row measured elsewhere under the same protocol: 'label|nominal bits|bits/weight|ppl[|bits as saved]'")
    args = p.parse_args()
    rows = json.loads(Path(args.json).read_text()) if os.path.exists(args.json) else []
    for spec in args.reuse:
        label, nominal, bpw, ppl, *disk = spec.split("|")
        if not any(r["label"] == label for r in rows):
            n = next(r for r in rows if r["label"] == "fp32")["linear_weights"]
            rows.append(dict(label=label, nominal=float(nominal), bits_per_weight=float(bpw), ppl=float(ppl),
                             disk_bits=float(disk[0]) if disk else float(bpw), linear_mb=float(bpw) * n / 8e6,
                             reused=True, windows=args.windows))
    if not args.plot_only:
        torch.set_num_threads(args.threads)
        from lowbit.io.models import wikitext2
        model, tok = load_model("smollm2-135m")
        test = open(args.text, encoding="utf-8").read() if args.text else wikitext2("test")
        valid = (open(args.text.replace("test.txt", "valid.txt"), encoding="utf-8").read() if args.text
                 else wikitext2("valid"))
        ids = token_ids(tok, test)
        done = {r["label"] for r in rows}
        if "fp32" not in done:
            t = time.perf_counter()
            ppl = perplexity(model, ids, max_windows=args.windows, progress=False).ppl
            n = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
            rows.append(dict(label="fp32", nominal=32, bits_per_weight=32.0, linear_mb=linear_mb(model), ppl=ppl,
                             model_mb=model_size(model).bytes / 1e6, linear_weights=n, windows=args.windows,
                             seconds=time.perf_counter() - t))
            print(f"fp32: ppl {ppl:.3f}", flush=True)
        calib = None
        for label, nominal, recipe in ROWS:
            if label in done or (args.only and not any(label.startswith(o) for o in args.only.split(";"))):
                continue
            if method_needs(recipe.method) and calib is None:
                calib = calibration(tok, valid, args.calibration)
            q = copy.deepcopy(model)
            t = time.perf_counter()
            quantize(q, recipe, calibration=calib if method_needs(recipe.method) else None, progress=True)
            took = time.perf_counter() - t
            ppl = perplexity(q, ids, max_windows=args.windows, progress=False).ppl
            rows.append(dict(label=label, nominal=nominal, method=recipe.method, ppl=ppl,
                             bits_per_weight=linear_bits_per_weight(q), linear_mb=linear_mb(q),
                             disk_bits=disk_bits(q),
                             model_mb=model_size(q).bytes / 1e6, quantize_s=took, windows=args.windows,
                             calibration=args.calibration if method_needs(recipe.method) else 0))
            print(f"{label}: {rows[-1]['bits_per_weight']:.3f} bits/w, ppl {ppl:.3f} ({took:.0f} s)", flush=True)
            tmp = args.json + ".tmp"
            Path(tmp).write_text(json.dumps(rows, indent=1))
            os.replace(tmp, args.json)
            del q
    Path(args.json + ".tmp").write_text(json.dumps(rows, indent=1))
    os.replace(args.json + ".tmp", args.json)
    base = next(r for r in rows if r["label"] == "fp32")
    print("\n| width | method | bits/weight (Linear, in memory) | as saved | Linear MB (saved) | ppl | x fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (-r["nominal"], r["ppl"])):
        d = r.get("disk_bits", r["bits_per_weight"])
        print(f"| {r['nominal']:g} | {r['label']}{' (reused)' if r.get('reused') else ''} | "
              f"{r['bits_per_weight']:.3f} | {d:.3f} | {d * base['linear_weights'] / 8e6:.1f} | {r['ppl']:,.2f} | "
              f"{r['ppl'] / base['ppl']:,.2f} |")
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
