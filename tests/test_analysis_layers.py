"""Per-layer analysis: error statistics against float64 formulas, histograms, outlier features."""
import copy
import json
import math

import pytest
import torch

import lowbit
from lowbit.analysis import collect_outliers, layer_report, outlier_features
from lowbit.analysis.plots import group_grid, plot_activation_histogram
from lowbit.eval import token_ids
from lowbit.pipeline import get_recipe

from conftest import wikitext_excerpt


@pytest.fixture(scope="module")
def small(smollm2_2layers):
    model, tok = smollm2_2layers
    ids = token_ids(tok, wikitext_excerpt("valid"))
    return model, [ids[i * 48:(i + 1) * 48] for i in range(2)]


def inputs_of(model, names, calib):
    """[tokens, in] float64 inputs of each layer over the calibration windows (plain hooks)."""
    got = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: got[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n in names]
    with torch.no_grad():
        for x in calib:
            model(x[None])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def test_layer_errors_against_float64_formulas(small, tmp_path):
    model, calib = small
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = layer_report(model, "w4g64-sym", calib, out_dir=tmp_path, histograms=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy was quantized
    # the reference: the same recipe through lowbit.quantize, then the formulas in float64
    q = lowbit.quantize(copy.deepcopy(model), "w4g64-sym", progress=False)
    names = [r.name for r in rows]
    assert len(names) == 14
    X = inputs_of(model, names, calib)
    for r in rows:
        w = model.get_submodule(r.name).weight.detach().double()
        wq = q.get_submodule(r.name).qweight.dequantize().double()
        d = w - wq
        assert r.sqnr_db == pytest.approx(10 * math.log10(float((w**2).sum() / (d**2).sum())), rel=1e-9)
        assert r.max_err == pytest.approx(float(d.abs().max()), rel=1e-9)
        assert r.clipped_share == 0.0  # absmax scales: nothing lies beyond the grid
        y, e = X[r.name] @ w.T, X[r.name] @ d.T
        # tr(D H D^T) takes its D^T D products in bf16 where the CPU has it (core/hessian.py): up to 1.2e-3
        # relative on these 96 tokens (H of rank 96: the roundings do not average), 1e-5 on real token counts
        assert r.output_rel_err == pytest.approx(float((e**2).sum() / (y**2).sum()), rel=3e-3)
    saved = json.loads((tmp_path / "layers.json").read_text())
    assert [s["name"] for s in saved] == names
    assert set(saved[0]) == {"name", "recipe", "sqnr_db", "max_err", "clipped_share", "output_rel_err", "sensitivity"}
    assert len(list(tmp_path.glob("hist-*.png"))) == 2


def test_clipped_share_counts_saturated_weights(small):
    """A percentile range clips the largest weights on purpose: the share is what lies past the grid."""
    model, calib = small
    scheme = get_recipe("w8").weights.replace(range="percentile", percentile=99.0, name=None)
    keep = {}
    rows = lowbit.analysis.layer_errors(model, lowbit.Recipe(scheme), None, keep=keep)
    assert all(r.output_rel_err is None for r in rows)  # no calibration: no output error
    for r in rows:
        w, q = keep[r.name]
        s = q.scale_values().double().reshape(-1, 1)  # one scale per output row; int8 codes -128..127
        past = (w.double() > 127.5 * s) | (w.double() < -128.5 * s)
        assert r.clipped_share == float(past.double().mean()) > 0


def test_group_grid_holds_the_groups_values(gen):
    w = torch.randn(8, 128, generator=gen)
    w[3, 70] = 9.0  # the widest group: row 3, second group of 64
    for name in ("w4g64-sym", "w4g64", "w3g64"):
        q = lowbit.quantize_tensor(w, get_recipe(name).weights)
        grid = group_grid(w, q)
        assert grid.numel() == 2 ** q.scheme.bits
        group = q.dequantize()[3, 64:128]
        assert torch.isin(group, grid).all() or torch.allclose(
            group[:, None].sub(grid[None]).abs().min(1).values, torch.zeros(64), atol=1e-6)
        half = float(grid[1] - grid[0]) / 2  # an integer zero point moves the ends by up to half a step
        assert grid.min() <= w[3, 64:128].min() + half + 1e-4 and grid.max() >= 9.0 - half - 1e-4


def test_outlier_features_on_planted_dims(gen, tmp_path):
    T, D = 200, 32
    acts = {}
    for s in range(4):
        x = torch.randn(T, D, generator=gen).clamp(-3, 3)
        if s < 3:  # dims 5 and 17: systematic, in 3 of 4 sites, on 20 and 40 tokens
            x[:20, 5] = 7.0
            x[50:90, 17] = -8.0
        if s == 0:  # dim 9: one token of one site, not systematic
            x[7, 9] = 6.5
        acts[f"site{s}"] = x
    rep = outlier_features(acts)
    by_dim = {f.dim: f for f in rep.features}
    assert set(by_dim) == {5, 9, 17}
    assert (by_dim[5].layers, by_dim[5].token_share) == (3, 0.1)
    assert (by_dim[17].layers, by_dim[17].token_share, by_dim[17].max_abs) == (3, 0.2, 8.0)
    assert (by_dim[9].layers, by_dim[9].token_share) == (1, 1 / T)
    assert [f.dim for f in rep.systematic()] == [17, 5]
    assert "2 systematic" in rep.summary()
    assert plot_activation_histogram(acts["site0"], tmp_path / "act.png").stat().st_size > 1000


def test_collect_outliers_on_smollm2(small):
    model, calib = small
    rep = collect_outliers(model, calib)
    # per block: the attention input (q/k/v read one tensor), o_proj's input, the MLP input
    # (gate/up); down_proj reads 1536 wide; plus lm_head's input
    assert len(rep.sites) == 2 * 3 + 1 and rep.tokens == 96
    assert rep.features and all(f.max_abs >= 6.0 for f in rep.features)
    with pytest.raises(ValueError, match="outlier_threshold"):
        outlier_features({"a": torch.zeros(2, 2)}, threshold=-1)
