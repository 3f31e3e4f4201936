"""Per-layer error statistics of a recipe: what quantization did to each Linear layer.

For each layer the recipe quantizes (W the weight its method quantized, after any transform;
Q the QTensor it chose):

    sqnr_db         10 log10(||W||^2 / ||W - Q||^2)            (core.error_stats)
    max_err         max |W - Q|
    clipped_share   share of weights beyond the grid's ends (they saturate instead of rounding)
    output_rel_err  ||(W - Q) X||^2 / ||W X||^2 on the calibration inputs X (None without calibration)

Calibrated methods give the statistics their own solve used (inputs of the quantized model so far);
data-free methods get the full-precision model's inputs.

    rows = layer_errors(model, "w4g64", calibration=windows)       # the model is left untouched
    layer_report(model, "w4g64", windows, out_dir="run/")          # + run/layers.json, histograms
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core import error_stats
from ..methods import method_needs
from ..pipeline import get_recipe, quantize
from ..pipeline.quantize import plan
from ..pipeline.sequential import layer_loss
from ..pipeline.stats import StatsCollector


@dataclass(frozen=True)
class LayerError:
    name: str
    recipe: str
    sqnr_db: float
    max_err: float
    clipped_share: float | None
    output_rel_err: float | None
    sensitivity: float | None = None  # measured KL of this layer alone (analysis.sensitivity), when given

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def full_precision_hessians(model, names: list[str], calibration) -> dict:
    """{layer: H = 2/n X^T X} of the full-precision model's inputs over the calibration windows."""
    with StatsCollector(model, names, hessian=True, magnitudes=False) as col:
        for b, x in enumerate(calibration):
            col.batch = b
            x = x[None] if x.dim() == 1 else x
            model(x, use_cache=False) if getattr(model, "config", None) is not None else model(x)
    return {n: col.stats[n].hessian for n in names}


def layer_errors(model, recipe, calibration=None, *, method: str | None = None, keep: dict | None = None,
                 progress: bool = False) -> list[LayerError]:
    """One LayerError per layer `recipe` quantizes, in model order; `model` is not changed (a copy is
    quantized). calibration: token windows ([T] or [b, T]); needed for output_rel_err and by
    calibrated methods. keep: a dict that receives {name: (W, QTensor)} (for histograms)."""
    recipe = get_recipe(recipe, method)
    names = list(plan(model, recipe))
    label = recipe.name or recipe.weights.name or recipe.weights.format
    hessians = {}
    seen: dict[str, LayerError] = {}

    def on_layer(name, w, q, stats):
        H = getattr(stats, "hessian", None)
        H = hessians.get(name) if H is None else H
        e = error_stats(w, q)
        out = layer_loss(w, q.dequantize(), H) if H is not None else None
        seen[name] = LayerError(name, label, e.sqnr_db, e.max_abs, e.clipped, out)
        if keep is not None:
            keep[name] = (w, q)

    if calibration is not None:
        calibration = list(calibration)
        if not method_needs(recipe.method):  # calibrated solvers hand over their own statistics
            hessians = full_precision_hessians(model, names, calibration)
    quantize(copy.deepcopy(model), recipe, calibration=calibration, progress=progress, on_layer=on_layer)
    return [seen[n] for n in names]


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def layer_report(model, recipe, calibration=None, out_dir=None, *, method: str | None = None,
                 sensitivity=None, histograms: int = 3, progress: bool = False) -> list[LayerError]:
    """layer_errors, with each layer's measured sensitivity (a Sensitivity from layer_sensitivity:
    its KL at the candidate named like the recipe, else at its reference candidate) and, with
    `out_dir`, out_dir/layers.json (what `lowbit report` draws) plus weight histograms with the
    quantization grid of the `histograms` layers of lowest SQNR (hist-<layer>.png)."""
    keep: dict = {}
    rows = layer_errors(model, recipe, calibration, method=method, keep=keep if out_dir else None,
                        progress=progress)
    if sensitivity is not None:
        rows = _with_sensitivity(rows, sensitivity)
    if out_dir is not None:
        from .plots import plot_weight_histogram

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "layers.json", [r.as_dict() for r in rows])
        for r in sorted(rows, key=lambda r: r.sqnr_db)[:histograms]:
            w, q = keep[r.name]
            plot_weight_histogram(w, q, out / f"hist-{r.name}.png", title=f"{r.name} ({r.recipe})")
    return rows


def _with_sensitivity(rows: list[LayerError], sens) -> list[LayerError]:
    c = sens.candidates.index(rows[0].recipe) if rows and rows[0].recipe in sens.candidates else sens.reference
    kl = {n: float(sens.cost[i, c]) for i, n in enumerate(sens.names)}  # measured, or scaled from it
    return [LayerError(**{**r.as_dict(), "sensitivity": kl.get(r.name)}) for r in rows]
