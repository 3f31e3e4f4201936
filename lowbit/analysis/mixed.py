"""Budgeted mixed precision: one candidate scheme per layer, the least total cost under a size budget.

An integer program over measured per-layer costs (analysis.sensitivity):

    minimise    sum_l sum_c cost[l, c] x[l, c]
    subject to  sum_c x[l, c] = 1                      (one candidate per layer)
                sum_l sum_c nbytes[l, c] x[l, c] <= B  (B = budget_bits / 8 * weights, floored)
                x binary

nbytes are the candidates' QTensor.nbytes on each layer's own shape (codes, scales and zero
points), so the budget holds as lowbit counts bytes. The budget covers the quantized Linear
layers of the blocks, as the uniform recipe names do (w4g64 = 4.5 bits per weight there); the
embedding table and output layer are stored as the recipe nearest the budget stores them.

    recipe = search(model, budget_bits=4.25, calibration=windows, candidates=["w3g64", "w4g64", "w8"])
    lowbit.quantize(model, recipe, calibration=windows)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..pipeline.recipe import Override, Recipe, auto_method
from ..methods import parse_method
from .sensitivity import DEFAULT_CANDIDATES, Sensitivity, candidate_recipes, layer_sensitivity


def solve_budget(cost, nbytes, budget_bytes: int) -> list[int]:
    """cost, nbytes: [L, C] -> the candidate index per layer with the least total cost whose bytes sum
    to at most `budget_bytes` (scipy.optimize.milp, HiGHS). The sum is checked in integers.

    Example: solve_budget([[3, 0], [1, 0]], [[1, 2], [1, 2]], 3) -> [1, 0]
    """
    from scipy.optimize import Bounds, LinearConstraint, milp  # an optional extra: imported where used

    cost = np.asarray(cost, dtype=np.float64)
    nb = np.asarray(nbytes, dtype=np.int64)
    if cost.shape != nb.shape or cost.ndim != 2 or cost.size == 0:
        raise ValueError(f"cost {cost.shape} and nbytes {nb.shape} must be the same non-empty [layers, candidates]")
    if not np.isfinite(cost).all():
        raise ValueError("cost has nan or inf entries: measure every (layer, candidate) first")
    smallest = int(nb.min(1).sum())
    if smallest > budget_bytes:
        raise ValueError(f"budget {budget_bytes} bytes is below the smallest choice ({smallest} bytes: every "
                         "layer at its smallest candidate); raise the budget or add a smaller candidate")
    L, C = cost.shape
    one_each = LinearConstraint(np.kron(np.eye(L), np.ones(C)), 1, 1)
    scale = float(np.abs(cost).max()) or 1.0  # HiGHS works best on costs near 1
    limit = budget_bytes
    for _ in range(20):  # a solution over budget by a float tolerance: tighten and solve again
        size = LinearConstraint(nb.reshape(1, -1).astype(np.float64), -np.inf, limit)
        res = milp(cost.ravel() / scale, integrality=np.ones(L * C), bounds=Bounds(0, 1),
                   constraints=[one_each, size], options={"mip_rel_gap": 1e-9})
        if res.x is None:
            raise ValueError(f"mixed-precision search: the integer program failed ({res.message})")
        choice = res.x.reshape(L, C).argmax(1)
        used = int(nb[np.arange(L), choice].sum())
        if used <= budget_bytes:
            return [int(c) for c in choice]
        limit -= used - budget_bytes
    raise ValueError("mixed-precision search: could not meet the byte budget exactly")


@dataclass(frozen=True)
class MixedPlan:
    recipe: Recipe
    choice: dict[str, str]   # layer -> candidate name
    nbytes: int              # bytes of the quantized layers
    budget_bytes: int
    bits_per_weight: float   # 8 * nbytes / weights
    expected_kl: float       # sum of the chosen layers' costs

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.choice.values():
            out[c] = out.get(c, 0) + 1
        return out


def plan_mixed(sens: Sensitivity, budget_bits: float, method: str = "rtn") -> MixedPlan:
    """The recipe choosing per layer among sens's candidates, at most `budget_bits` per weight on
    average over the layers (bytes, floored: 8 * bytes <= budget_bits * weights)."""
    if not budget_bits > 0:
        raise ValueError(f"budget_bits={budget_bits!r}: give a positive average bits per weight, e.g. 4.25")
    weights = int(sens.numel.sum())
    budget_bytes = int(np.floor(budget_bits * weights / 8))
    choice = solve_budget(sens.cost.numpy(), sens.nbytes.numpy(), budget_bytes)
    recipes = sens.recipes
    # the base: the candidate nearest the budget (its embeddings / output layer and method defaults)
    bits = [float(8 * sens.nbytes[:, c].sum() / weights) for c in range(len(recipes))]
    base_c = min(range(len(recipes)), key=lambda c: (abs(bits[c] - budget_bits), bits[c]))
    base = recipes[base_c]
    chain = auto_method(base) if method == "auto" else method
    overrides = tuple(Override(n, weights=recipes[c].weights) for n, c in zip(sens.names, choice) if c != base_c)
    # layers of the base recipe's scope outside sens.names (none by default) keep the base scheme
    recipe = base.replace(method=chain, overrides=overrides, name=f"mixed-{budget_bits:g}")
    used = int(sens.nbytes[torch.arange(len(choice)), torch.tensor(choice)].sum())
    return MixedPlan(recipe, {n: sens.candidates[c] for n, c in zip(sens.names, choice)}, used, budget_bytes,
                     8.0 * used / weights, float(sens.cost[torch.arange(len(choice)), torch.tensor(choice)].sum()))


def cost_method(method: str, candidates) -> str:
    """The method chain whose weights a search measures for `method`: the chain itself, transforms
    included ("awq+gptq": AWQ scales for each layer alone, then GPTQ, on the full-precision inputs);
    "auto" as lowbit.quantize resolves it for the first candidate. Costs measured on RTN weights
    misprice a calibrated recipe: on SmolLM2 they made mixed awq+gptq lose to uniform
    (docs/benchmarks.md)."""
    if method == "auto":
        method = auto_method(candidate_recipes(candidates)[0])
    transforms, solver = parse_method(method)
    return "+".join((*transforms, solver))


def search(model, budget_bits: float, calibration, candidates=DEFAULT_CANDIDATES, method: str = "rtn", *,
           sensitivity: "Sensitivity | None" = None, measure: str = "reference", solver_calibration=None,
           score: str = "auto", progress: bool = True) -> Recipe:
    """A Recipe with per-layer overrides that minimises the expected KL of `model` with at most
    `budget_bits` bits per weight over the blocks' Linear layers (scales and zeros counted).

    calibration: token windows ([T] or [b, T]; e.g. 4 windows of 256 tokens) on which each layer's
    cost is measured (layer_sensitivity); candidates: recipe names or weight-only Recipes;
    method: the method the recipe will run ("rtn", "awq+gptq", "auto"); the costs are measured on
    the weights that chain makes (cost_method). Pass `sensitivity` to reuse one measurement for several
    budgets. solver_calibration: for a calibrated method, the windows it will calibrate on (the
    costs are then scored on `calibration`, held out from them; see layer_sensitivity). score:
    "fisher" (a causal LM's default: every cost estimated from one backward pass, about one
    calibrated quantization's time) or "full" (a forward through the rest of the model per
    measured layer, `measure`). Use the result as lowbit.quantize(model, recipe, calibration=...).
    """
    if sensitivity is None:
        sensitivity = layer_sensitivity(model, calibration, candidates, method=cost_method(method, candidates),
                                        measure=measure, solver_calibration=solver_calibration,
                                        score=score, progress=progress)
    return plan_mixed(sensitivity, budget_bits, method).recipe
