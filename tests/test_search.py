"""Budgeted mixed precision: the integer program's optimum, the byte budget, the measured costs."""
import copy
import itertools
import json
import re

import numpy as np
import pytest
import torch

import lowbit
from lowbit.analysis import layer_sensitivity, plan_mixed, solve_budget
from lowbit.eval import linear_bits_per_weight, token_ids
from lowbit.methods import rtn
from lowbit.pipeline import Recipe, get_recipe

from conftest import save_hf_folder, wikitext_excerpt


def brute_force(cost, nbytes, budget):
    best = None
    for choice in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        rows = np.arange(cost.shape[0])
        if nbytes[rows, choice].sum() <= budget:
            c = cost[rows, choice].sum()
            best = c if best is None or c < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
def test_milp_finds_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    L, C = 5, 3
    nbytes = np.sort(rng.integers(10, 100, size=(L, C)), axis=1)
    cost = np.sort(rng.random((L, C)), axis=1)[:, ::-1].copy()  # more bytes, less cost
    budget = int(nbytes.min(1).sum() + rng.integers(0, nbytes.max(1).sum() - nbytes.min(1).sum()))
    choice = solve_budget(cost, nbytes, budget)
    rows = np.arange(L)
    assert nbytes[rows, choice].sum() <= budget
    assert cost[rows, choice].sum() == pytest.approx(brute_force(cost, nbytes, budget), abs=1e-12)


def test_milp_budget_checks():
    assert solve_budget([[3.0, 0.0], [1.0, 0.0]], [[1, 2], [1, 2]], 3) == [1, 0]
    with pytest.raises(ValueError, match="below the smallest choice"):
        solve_budget([[1.0, 0.0]], [[5, 9]], 4)
    with pytest.raises(ValueError, match="nan"):
        solve_budget([[float("nan"), 0.0]], [[5, 9]], 10)


@pytest.fixture(scope="module")
def small(smollm2_2layers):
    model, tok = smollm2_2layers
    ids = token_ids(tok, wikitext_excerpt("valid"))
    return model, [ids[i * 48:(i + 1) * 48] for i in range(2)]


@pytest.fixture(scope="module")
def sens(small):
    model, calib = small
    return layer_sensitivity(model, calib, ["w2g64", "w3g64", "w4g64", "w8"], score="full", progress=False)


def test_budget_met_in_bytes_on_smollm2(small, sens):
    model, calib = small
    weights = int(sens.numel.sum())
    for budget in (3.5, 4.25):
        plan = plan_mixed(sens, budget)
        recipe = Recipe.from_json(plan.recipe.to_json())
        assert recipe == plan.recipe
        q = lowbit.quantize(copy.deepcopy(model), recipe, progress=False)
        got = sum(m.qweight.nbytes for n, m in q.named_modules() if n.startswith("model.layers.") and
                  hasattr(m, "qweight"))
        assert got == plan.nbytes <= int(np.floor(budget * weights / 8))
        assert linear_bits_per_weight(q) <= budget
        # the budget is used: no layer could move to a bigger candidate within it
        assert plan.budget_bytes - plan.nbytes < (sens.nbytes.max(1).values - sens.nbytes.min(1).values).max()
        assert len(set(plan.choice.values())) > 1  # mixed, not uniform
    # the base recipe is the candidate nearest the budget: w4g64's int8 embeddings
    assert plan_mixed(sens, 4.25).recipe.embeddings == get_recipe("w4g64").embeddings


def test_measured_kl_matches_a_whole_model_run(small, sens):
    """The tail runner (blocks i.. on cached inputs, logits every 2nd position) against a plain
    forward of the whole model with one layer's weight replaced."""
    model, calib = small
    name = "model.layers.1.self_attn.v_proj"
    l, c = sens.names.index(name), sens.reference
    ids = torch.stack(calib)
    q = copy.deepcopy(model)
    lin = q.get_submodule(name)
    lin.weight.data = rtn(lin.weight.data, sens.recipes[c].weights).dequantize()
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits.double(), -1)[:, 0:-1:2]
        got = torch.log_softmax(q(ids).logits.double(), -1)[:, 0:-1:2]
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert sens.kl[l, c] == pytest.approx(kl, rel=1e-3)
    assert torch.isnan(sens.kl[:, [i for i in range(4) if i != c]]).all()  # measure="reference"


def test_costs_and_spearman(sens):
    cost = sens.cost
    assert (cost[:, 0] > cost[:, 1]).all() and (cost[:, 1] > cost[:, 3]).all()  # fewer bits cost more
    rho = sens.spearman()
    assert set(rho) == {"proxy", "output_err"} and all(-1 <= v <= 1 for v in rho.values())
    # output error ranks the layers' measured KL clearly better than chance (14 layers)
    assert rho["output_err"] > 0.3
    # JSON round trip
    back = type(sens).from_dict(json.loads(json.dumps(sens.to_dict())))
    assert torch.equal(back.nbytes, sens.nbytes) and torch.allclose(back.cost, cost)


def test_search_is_exported_and_returns_a_recipe(small):
    model, calib = small
    recipe = lowbit.search(model, budget_bits=3.0, calibration=calib, candidates=["w2g64", "w4g64"],
                           progress=False)
    assert isinstance(recipe, Recipe) and recipe.name == "mixed-3"
    with pytest.raises(ValueError, match="smallest choice"):
        lowbit.search(model, budget_bits=2.0, calibration=calib, candidates=["w2g64", "w4g64"], progress=False)


def test_cli_quantize_with_a_budget(smollm2_2layers, tmp_path, capsys):
    from lowbit.cli import main

    model, tok = smollm2_2layers
    src = save_hf_folder(model, tok, tmp_path / "small")
    text = tmp_path / "text.txt"
    text.write_text(wikitext_excerpt("valid")[:20000])
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--budget", "3.5", "--candidates", "w2g64,w4g64", "--method", "rtn",
                 "--out", str(out), "--text", str(text), "--window", "64"]) == 0
    cap = capsys.readouterr()
    said = cap.out
    assert "mixed precision at 3.5 bits/weight" in said and "saved mixed-3.5 (rtn)" in said
    assert "estimated from one backward pass (fisher)" in said  # the cheap score is the CLI's default
    # progress with an ETA over the layers costed: "sensitivity: 100%|...| 14/14 [00:01<00:00, ...]"
    assert re.search(r"sensitivity: +\d+%.*14/14 \[[0-9:]+<[0-9:]+", cap.err), cap.err[-500:]
    q = lowbit.load(out)
    assert 3.4 < linear_bits_per_weight(q) <= 3.5
    assert {m.qweight.scheme.bits for n, m in q.named_modules() if n.startswith("model.layers.") and
            hasattr(m, "qweight")} == {2, 4}


def test_calibrated_costs_fit_on_held_out_windows(smollm2_2layers):
    """GPTQ fitted on the scored windows hides its error in them: with the Hessian from other
    windows the measured costs are higher (and the fitted statistics really come from them)."""
    model, tok = smollm2_2layers
    ids = token_ids(tok, wikitext_excerpt("valid"))
    score = [ids[i * 32:(i + 1) * 32] for i in range(2)]
    fit = [ids[64 + i * 64:64 + (i + 1) * 64] for i in range(4)]
    names = ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    same = layer_sensitivity(model, score, ["w3g64", "w4g64"], method="gptq", names=names, score="full",
                             progress=False)
    held = layer_sensitivity(model, score, ["w3g64", "w4g64"], method="gptq", names=names,
                             solver_calibration=fit, score="full", progress=False)
    assert (held.output_err > same.output_err).all()  # 64 tokens, 576/1536 inputs: GPTQ overfits them
    c = held.reference
    assert (held.kl[:, c] > same.kl[:, c]).all()
    # the Fisher estimate (the default score) sees it too
    same_f, held_f = (layer_sensitivity(model, score, ["w3g64", "w4g64"], method="gptq", names=names,
                                        solver_calibration=f, progress=False) for f in (None, fit))
    assert (held_f.fisher > same_f.fisher).all()
    # rtn fits nothing: the held-out windows change nothing
    a = layer_sensitivity(model, score, ["w3g64"], names=names, progress=False)
    b = layer_sensitivity(model, score, ["w3g64"], names=names, solver_calibration=fit, progress=False)
    assert torch.equal(a.fisher, b.fisher)
