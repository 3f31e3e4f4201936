"""matplotlib without a display (Agg), figures written atomically, and the PNG plots of the
per-layer analysis (matplotlib is imported inside each function: an optional extra).

    plot_weight_histogram(w, q, "hist.png")        # weights, the grid of their widest group drawn over
    plot_activation_histogram(x, "act.png")        # inputs, int8 per-tensor grid and LLM.int8()'s +-6
    plot_sensitivity(sens, "sens.png")             # proxy and output error against measured KL
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..core import QTensor
from ..core.granularity import GroupView
from ..io.atomic import write_atomic


def pyplot():
    """matplotlib.pyplot on the Agg backend (an optional dependency: pip install matplotlib)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError("plots need matplotlib: pip install 'lowbit[report]' (or matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def atomic_png(fig, path: "str | Path", dpi: int = 110) -> Path:
    """Save `fig` as PNG at `path` (temp file, then rename) and close it. -> the path."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return write_atomic(Path(path), buf.getvalue())


def group_grid(w: torch.Tensor, q: QTensor) -> torch.Tensor | None:
    """The values representable in the group of q holding w's largest |value| ([2^bits], sorted), or
    None for learned codebooks. w: [out, in] as quantized."""
    if q.codebook is not None:
        return None
    view = GroupView(q.shape, q.scheme.granularity)
    parts = view.parts(w.float())
    scales = view.split_stats(q.scale_values())
    z = q.zero_values()
    zeros = view.split_stats(z) if z is not None else [None] * len(scales)
    k = max(range(len(parts)), key=lambda i: float(parts[i].abs().max()))
    g = int(parts[k].abs().amax(1).argmax())
    s = scales[k].reshape(-1)[g]
    v = q.scheme.fmt.values.double()
    grid = (v - zeros[k].reshape(-1)[g]) * s if zeros[k] is not None else v * s
    return grid.sort().values.float()


def plot_weight_histogram(w: torch.Tensor, q: QTensor, path, title: str = "") -> Path:
    """Histogram of w (log counts) with the quantized values of its widest group as vertical lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = w.float().flatten()
    ax.hist(x.numpy(), bins=200, log=True, color="#4c72b0", alpha=0.8, label="weights")
    ax.hist(q.dequantize().flatten().numpy(), bins=200, log=True, histtype="step", color="#dd8452",
            label="quantized")
    grid = group_grid(w, q)
    if grid is not None:
        for v in grid.tolist():
            ax.axvline(v, color="#c44e52", lw=0.6, alpha=0.6)
        ax.plot([], [], color="#c44e52", lw=0.6, label=f"grid of the widest group ({grid.numel()} values)")
    ax.set_xlabel("weight value")
    ax.set_ylabel("count (log)")
    ax.set_title(title or "weights")
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_activation_histogram(x: torch.Tensor, path, title: str = "", threshold: float = 6.0) -> Path:
    """Histogram of activations x (log counts) with an int8 per-tensor absmax grid (every 16th
    level drawn) and LLM.int8()'s outlier threshold +-threshold."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = x.float().flatten()
    ax.hist(x.numpy(), bins=200, log=True, color="#55a868", alpha=0.8, label="activations")
    s = float(x.abs().max()) / 127
    for k in range(-127, 128, 16):
        ax.axvline(k * s, color="#8172b2", lw=0.5, alpha=0.5)
    ax.plot([], [], color="#8172b2", lw=0.5, label=f"int8 per-tensor grid (every 16th of 255, step {s:.3g})")
    for t in (-threshold, threshold):
        ax.axvline(t, color="#c44e52", ls="--", lw=1)
    ax.plot([], [], color="#c44e52", ls="--", label=f"|x| = {threshold:g} (LLM.int8() outliers)")
    ax.set_xlabel("input value")
    ax.set_ylabel("count (log)")
    ax.set_title(title or "activations")
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_sensitivity(sens, path) -> Path:
    """Two log-log scatters over the layers at the reference candidate: the HAWQ proxy and the
    output error against the measured KL, with their Spearman rank correlations."""
    plt = pyplot()
    c, rho = sens.reference, sens.spearman()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    kinds = [l.rsplit(".", 1)[-1] for l in sens.names]
    for ax, key, label in ((axes[0], "proxy", "tr(H)/n · ||W - Q||²  (HAWQ proxy)"),
                           (axes[1], "output_err", "||(W - Q)X||² / ||WX||²  (output error)")):
        xs = getattr(sens, key)[:, c]
        for kind in sorted(set(kinds)):
            m = torch.tensor([k == kind for k in kinds])
            ax.scatter(xs[m].numpy(), sens.kl[m, c].clamp(min=1e-8).numpy(), s=10, label=kind)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"measured KL, only this layer at {sens.candidates[c]}")
        ax.set_title(f"Spearman ρ = {rho[key]:.3f} over {len(sens.names)} layers")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path) -> Path:
    return atomic_png(fig, path)
