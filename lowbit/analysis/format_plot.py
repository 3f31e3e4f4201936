"""The formats, drawn: where each format's values lie and how much rounding to it costs.

format_profile(name) returns the data; plot_formats(names, path) draws one PNG with three
panels: the positive values as ticks on a log axis of |value| (and the share of all values that
lie in [-1, 1]), the number of values per octave (density on a log axis), and the relative
rounding error |q(x) - x| / |x| across the range after scaling every format to the same maximum.

    p = format_profile("fp8_e4m3")
    p.share_within_one        # 113 of 253 finite values lie in [-1, 1]
    plot_formats(["fp8_e4m3", "fp4_e2m1", "int4", "nf4"], "formats.png")
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import formats
from .plots import atomic_png, pyplot

DECADES = 8  # the error panel spans max * 1e-8 .. max


@dataclass(frozen=True)
class FormatProfile:
    name: str
    values: np.ndarray         # every finite value, sorted, float64
    positive: np.ndarray       # the positive ones
    share_within_one: float    # fraction of the finite values in [-1, 1]
    x: np.ndarray              # points in (0, 1] (log spaced), as fractions of the format's max
    rel_err: np.ndarray        # |q(x) - x| / x for the format scaled so that its max is 1


def format_profile(name: str, points: int = 2001) -> FormatProfile:
    """Values and relative rounding error of format `name` (formats.get names, at most 16 bits).

    Example: format_profile("int4").positive -> [1., 2., ..., 7.]
    """
    f = formats.get(name)
    values = f.values.numpy()
    top = f.max  # the largest value: what absmax scaling maps a group's absmax onto
    x = np.logspace(-DECADES, 0, points)
    q = f.round(torch.from_numpy(x * top), saturate=True).double().numpy() / top
    return FormatProfile(f.name, values, values[values > 0], float(np.mean(np.abs(values) <= 1.0)), x,
                         np.abs(q - x) / x)


def plot_formats(names: list[str], path: "str | Path") -> Path:
    """One PNG comparing the formats `names` (see the module doc); written atomically. -> the path."""
    if not names:
        raise ValueError("plot_formats: give at least one format name, e.g. fp8_e4m3 int4")
    profiles = [format_profile(n) for n in names]
    plt = pyplot()
    fig, (ax_v, ax_d, ax_e) = plt.subplots(3, 1, figsize=(9, 3.2 + 1.6 * len(profiles)),
                                           gridspec_kw={"height_ratios": [0.5 * len(profiles) + 0.5, 1.5, 1.8]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, p in enumerate(profiles):
        c = colors[i % len(colors)]
        ax_v.eventplot([p.positive], lineoffsets=i, linelengths=0.7, colors=[c], linewidths=0.8)
        ax_v.text(1.01, i, f"{p.share_within_one:.0%} in [-1, 1]", transform=ax_v.get_yaxis_transform(),
                  va="center", fontsize=8)
        octave = np.floor(np.log2(p.positive))
        lo, hi = octave.min(), octave.max()
        counts = np.bincount((octave - lo).astype(int), minlength=int(hi - lo + 1))
        ax_d.step(2.0 ** np.arange(lo, hi + 1), counts, where="post", color=c, label=p.name)
        ax_e.loglog(p.x, np.maximum(p.rel_err, 1e-9), color=c, linewidth=0.5, alpha=0.25)
        bx, bmax = _envelope(p.x, p.rel_err)
        ax_e.loglog(bx, bmax, color=c, label=p.name, linewidth=1.6)
    ax_v.set_xscale("log")
    ax_v.set_yticks(range(len(profiles)), [p.name for p in profiles])
    ax_v.axvline(1.0, color="grey", linewidth=0.6, linestyle=":")
    ax_v.set_title("positive values (|value|, log axis); the share of all values in [-1, 1] on the right",
                   fontsize=9)
    ax_d.set_xscale("log")
    ax_d.set_yscale("log")
    ax_d.set_ylabel("values per octave")
    ax_d.legend(fontsize=8, ncol=min(4, len(profiles)))
    ax_e.set_xlabel("x / max (every format scaled to the same max)")
    ax_e.set_ylabel("|q(x) - x| / x")
    ax_e.set_ylim(1e-4, 2)
    ax_e.set_title("relative rounding error across the range (bold: the worst in each tenth of a decade)",
                   fontsize=9)
    ax_e.legend(fontsize=8, ncol=min(4, len(profiles)))
    fig.tight_layout()
    return atomic_png(fig, path)


def _envelope(x: np.ndarray, err: np.ndarray, per_decade: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The largest error in each 1/per_decade of a decade: (bin centres, maxima)."""
    edges = np.floor(np.log10(x) * per_decade)
    keys, where = np.unique(edges, return_inverse=True)
    top = np.zeros(len(keys))
    np.maximum.at(top, where, err)
    return 10 ** ((keys + 0.5) / per_decade), np.maximum(top, 1e-9)
