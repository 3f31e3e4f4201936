"""`lowbit report RUN_DIR`: one HTML page (no JavaScript) with PNG plots of a compare run.

Sections: the headline table; perplexity against size for every row, the Pareto front marked;
per-layer error and sensitivity bars (layers.json); histograms of the worst layers with their
quantization grid (histograms/*.npz); the memory breakdown per recipe. A missing input is named
on the page instead of its plot. Written to RUN_DIR/index.html and RUN_DIR/report/*.png, each
file atomically (see run_dir.py for the file contract).

    write_report("runs/smollm2")   # -> runs/smollm2/index.html
"""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from ..io.atomic import write_atomic
from ..eval.size import BITS_LAYERS, BITS_MODEL
from .compare import bits_legend
from .plots import atomic_png, pyplot
from .run_dir import load_run

IMG = "report"  # the PNGs' folder inside RUN_DIR
WORST = 4  # histograms of this many layers


def pareto_front(sizes: list[float], ppls: list[float]) -> list[int]:
    """Indices of the rows no other row beats on both size and perplexity, by increasing size.

    Example: pareto_front([1, 2, 3], [5, 6, 4]) -> [0, 2]
    """
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], ppls[i]))
    front, best = [], float("inf")
    for i in order:
        if ppls[i] < best:
            front.append(i)
            best = ppls[i]
    return front


def write_report(run_dir: "str | Path") -> Path:
    """Write RUN_DIR/index.html and its plots; -> the page's path."""
    run = Path(run_dir)
    data = load_run(run)
    table, layers, hist = data["table"], data["layers"], data["histograms"]
    rows = table["comparison"]["rows"]
    parts = [f"<h1>lowbit report: {html.escape(str(table.get('model', '?')))}</h1>", _table_html(table["comparison"])]
    absent = []
    if table["comparison"].get("metric", "ppl") == "cosine":  # an encoder: sentence-embedding fidelity
        parts.append(_figure(run, "cosine_vs_size.png", _plot_pareto(rows, "cosine"),
                             "Embedding error against size", "Every recipe tried, 1 - mean cosine of the sentence "
                             "embeddings against fp32; the line joins the Pareto front (no row is both smaller "
                             "and better). fp32 (1 - cos = 0) is left out of the log axis."))
    else:
        parts.append(_figure(run, "ppl_vs_size.png", _plot_pareto(rows), "Perplexity against size",
                             "Every recipe tried; the line joins the Pareto front (no row is both smaller and "
                             "better)."))
    if layers:
        parts.append(_figure(run, "layers.png", _plot_layers(layers), "Per-layer error and sensitivity",
                             "SQNR per layer (higher is better) and, where measured, the sensitivity of the loss "
                             "to quantizing that layer alone."))
    else:
        absent.append("per-layer error and sensitivity (no layers.json in the run folder)")
    worst = _worst(layers, hist)
    if worst:
        parts.append(_figure(run, "histograms.png", _plot_histograms(worst), "Histograms of the worst layers",
                             "Weight values of the layers with the lowest SQNR; vertical lines: the quantization "
                             "grid."))
    else:
        absent.append("histograms of the worst layers (no histograms/*.npz in the run folder)")
    memory = table.get("memory")
    if memory:
        parts.append(_figure(run, "memory.png", _plot_memory(memory), "Memory",
                             html.escape(f"{memory['source']}; {memory['kv_note']}")))
    else:
        absent.append("memory breakdown (table.json has no memory table)")
    if absent:
        parts.append("<h2>Not in this run</h2><ul>" + "".join(f"<li>{html.escape(a)}</li>" for a in absent)
                     + "</ul>")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>lowbit report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}"
        "figcaption{color:#555;font-size:13px}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    return write_atomic(run / "index.html", page)


def _figure(run: Path, name: str, fig, title: str, caption: str) -> str:
    atomic_png(fig, run / IMG / name)
    return (f"<h2>{html.escape(title)}</h2><figure><img src=\"{IMG}/{name}\" alt=\"{html.escape(title)}\">"
            f"<figcaption>{caption}</figcaption></figure>")


COLUMNS = [("recipe", "recipe", "{}"), ("method", "method", "{}"), ("embeddings", "emb/out", "{}"),
           (BITS_LAYERS.key, BITS_LAYERS.label, "{:.2f}"), (BITS_MODEL.key, BITS_MODEL.label, "{:.2f}"),
           ("size_mb", "size MB", "{:.1f}"), ("ppl", "ppl", "{:.3f}"),
           ("delta_ppl_pct", "Δppl %", "{:+.2f}"), ("kl", "KL", "{:.4f}"), ("top1", "top-1", "{:.3f}"),
           ("decode_tok_s", "tok/s", "{:.1f}"), ("quantize_s", "quant s", "{:.1f}")]


ENCODER_COLUMNS = COLUMNS[:6] + [("cosine", "cosine", "{:.5f}"), ("cosine_min", "min cosine", "{:.4f}"),
                                 ("spearman", "Spearman", "{:.4f}"), ("quantize_s", "quant s", "{:.1f}")]


def _table_html(cmp: dict) -> str:
    encoder = cmp.get("metric", "ppl") == "cosine"
    columns = ENCODER_COLUMNS if encoder else COLUMNS
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    body = []
    for r in cmp["rows"]:
        cells = [fmt.format(r[k]) if r.get(k) is not None else "–" for k, _, fmt in columns]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    n, w = cmp["windows"], cmp["window"]
    note = f"Evaluated on windows 0-{n - 1} of {w} tokens; calibrated rows read the {cmp['calibration_windows']} " \
           "windows after them."
    if encoder:
        note = f"Evaluated on {cmp.get('sentences', '?')} sentences of the text's first half (mean-pooled " \
               f"embeddings against fp32); calibrated rows read the last {cmp['calibration_windows']} windows " \
               f"of {w} tokens."
    note += f" {bits_legend()}"
    return f"<h2>Headline table</h2><table><tr>{head}</tr>{''.join(body)}</table><p>{html.escape(note)}</p>"


OFF_SCALE = 4.0  # rows above this many times the best perplexity are drawn at the top edge


def _plot_pareto(rows: list[dict], metric: str = "ppl"):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    if metric == "cosine":  # 1 - cosine on a log axis; fp32 (exactly 0) has no place on it
        rows = [{**r, "ppl": 1 - r["cosine"]} for r in rows if r["cosine"] is not None and r["cosine"] < 1]
        ax.set_yscale("log")
    sizes = [r["size_mb"] for r in rows]
    ppls = [r["ppl"] for r in rows]
    # a collapsed recipe (ppl 1e6) would flatten the rest; the log axis of 1 - cos holds them all
    cap = OFF_SCALE * min(ppls) if metric == "ppl" else max(ppls)
    shown = [min(p, cap) for p in ppls]
    front = pareto_front(sizes, ppls)
    ax.plot([sizes[i] for i in front], [shown[i] for i in front], color="tab:red", zorder=2, label="Pareto front")
    for i, r in enumerate(rows):
        off = ppls[i] > cap
        ax.scatter([sizes[i]], [shown[i]], marker="^" if off else "o", zorder=3,
                   color="tab:red" if i in front else "tab:blue")
    ax.set_xscale("log")
    ax.set_ylim(min(ppls) * (0.95 if metric == "ppl" else 0.7), cap * (1.08 if metric == "ppl" else 1.4))
    _labels(ax, [r["recipe"] + (f" ↑{ppls[i]:.2g}" if ppls[i] > cap else "") for i, r in enumerate(rows)],
            sizes, shown)
    ax.set_xlabel("model size, MB (log)" + ("; ↑: perplexity off the scale" if metric == "ppl" else ""))
    ax.set_ylabel("1 - mean cosine (log)" if metric == "cosine" else "perplexity")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _labels(ax, labels: list[str], xs: list[float], ys: list[float]) -> None:
    """Annotate points, moving a label up while it would overlap one already placed (in pixels)."""
    ax.figure.canvas.draw()  # fixes the data -> pixel transform
    placed: list[tuple[float, float, float]] = []  # x, y, width of the labels placed, in pixels
    for i in sorted(range(len(labels)), key=lambda i: ys[i]):
        x, y = ax.transData.transform((xs[i], ys[i]))
        width, dy = 6.5 * len(labels[i]), 3.0
        while any(abs(y + dy - py) < 11 and x < px + pw and px < x + width for px, py, pw in placed):
            dy += 11
        ax.annotate(labels[i], (xs[i], ys[i]), textcoords="offset pixels", xytext=(5, dy), fontsize=8)
        placed.append((x, y + dy, width))


def _plot_layers(layers: list[dict]):
    plt = pyplot()
    recipes = list(dict.fromkeys(x["recipe"] for x in layers))
    sens = any(x.get("sensitivity") is not None for x in layers)
    names = list(dict.fromkeys(x["name"] for x in layers))
    fig, axes = plt.subplots(2 if sens else 1, 1, figsize=(11, 6.5 if sens else 3.8), squeeze=False)
    width = 0.8 / len(recipes)
    for k, recipe in enumerate(recipes):
        by = {x["name"]: x for x in layers if x["recipe"] == recipe}
        xs = np.arange(len(names)) + k * width
        axes[0, 0].bar(xs, [by[n]["sqnr_db"] if n in by else 0 for n in names], width, label=recipe)
        if sens:
            axes[1, 0].bar(xs, [(by[n].get("sensitivity") or 0) if n in by else 0 for n in names], width,
                           label=recipe)
    axes[0, 0].set_ylabel("SQNR dB")
    if sens:
        axes[1, 0].set_ylabel("sensitivity")
    for ax in axes[:, 0]:
        ax.legend(fontsize=8)
        ax.set_xlim(-0.5, len(names))
    step = max(1, len(names) // 40)  # at most ~40 labels
    axes[-1, 0].set_xticks(np.arange(0, len(names), step), names[::step], rotation=90, fontsize=6)
    for ax in axes[:-1, 0]:
        ax.set_xticks([])
    fig.tight_layout()
    return fig


def _worst(layers: list | None, hist: dict) -> list[dict]:
    """Up to WORST histogram files, those of the lowest-SQNR layers first."""
    loaded = []
    for stem, path in hist.items():
        with np.load(path, allow_pickle=False) as z:
            if "values" not in z:
                raise ValueError(f"{path}: a histogram file needs a 'values' array (see lowbit.analysis.run_dir)")
            loaded.append({"name": str(z["name"]) if "name" in z else stem,
                           "recipe": str(z["recipe"]) if "recipe" in z else "",
                           "values": np.asarray(z["values"], dtype=np.float64).ravel(),
                           "grid": np.asarray(z["grid"], dtype=np.float64).ravel() if "grid" in z else None})
    sqnr = {(x["name"], x["recipe"]): x["sqnr_db"] for x in layers or []}
    by_name = {x["name"]: x["sqnr_db"] for x in layers or []}
    loaded.sort(key=lambda h: sqnr.get((h["name"], h["recipe"]), by_name.get(h["name"], float("inf"))))
    return loaded[:WORST]


def _plot_histograms(worst: list[dict]):
    plt = pyplot()
    fig, axes = plt.subplots(len(worst), 1, figsize=(9, 2.3 * len(worst)), squeeze=False)
    for ax, h in zip(axes[:, 0], worst):
        ax.hist(h["values"], bins=200, color="tab:blue", alpha=0.8)
        if h["grid"] is not None:
            for g in h["grid"]:
                ax.axvline(g, color="tab:red", linewidth=0.6, alpha=0.7)
        ax.set_yscale("log")
        ax.set_title(f"{h['name']} {h['recipe']}".strip(), fontsize=9)
    fig.tight_layout()
    return fig


def _plot_memory(memory: dict):
    plt = pyplot()
    rows = memory["rows"]
    names = [r["recipe"] for r in rows]
    parts = [("quantized_bytes", "quantized layers"), ("embedding_bytes", "embeddings / output"),
             ("other_bytes", "other (float)"), ("kv_cache_bytes", "KV cache")]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bottom = np.zeros(len(rows))
    for key, label in parts:
        vals = np.array([r[key] for r in rows], dtype=float) / 1e6
        if vals.any():
            ax.bar(names, vals, bottom=bottom, label=label)
            bottom += vals
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"{r[BITS_MODEL.key]:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("MB")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    ax.legend(fontsize=8)
    ax.set_title(f"{memory['params'] / 1e6:.1f}M parameters; context {memory['context']}, batch {memory['batch']}; "
                 f"above each bar: {BITS_MODEL.label}", fontsize=9)
    fig.tight_layout()
    return fig
