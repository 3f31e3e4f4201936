"""`lowbit quantize SRC --budget BITS`: the mixed-precision recipe from lowbit.search, for cli.py."""
from __future__ import annotations

from .analysis.mixed import DEFAULT_CANDIDATES, cost_method, plan_mixed
from .analysis.sensitivity import layer_sensitivity
from .pipeline import Recipe

SENSITIVITY_WINDOWS, SENSITIVITY_WINDOW = 4, 256


def budget_recipe(model, ids, budget: float, candidates: str | None, method: str, window: int = 512) -> Recipe:
    """Measure each layer's cost on the last 4 windows of min(256, window) tokens of `ids` (the
    calibration text, where the calibrated methods read it) and return the recipe meeting `budget`
    bits per weight."""
    names = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else list(DEFAULT_CANDIDATES)
    n, w = SENSITIVITY_WINDOWS, min(SENSITIVITY_WINDOW, window)
    if len(ids) < n * w:
        raise ValueError(f"--budget: the calibration text has {len(ids)} tokens; the search measures "
                         f"{n} windows of {w}: give a longer --text")
    windows = [ids[len(ids) - (i + 1) * w: len(ids) - i * w] for i in reversed(range(n))]
    sens = layer_sensitivity(model, windows, names, method=cost_method(method, names))
    plan = plan_mixed(sens, budget, method)
    print(f"mixed precision at {budget:g} bits/weight: {plan.bits_per_weight:.4f} over the blocks' layers "
          f"({plan.nbytes} of {plan.budget_bytes} bytes), "
          + ", ".join(f"{k} x{v}" for k, v in sorted(plan.counts().items()))
          + f"; costs measured in {sens.seconds:.0f} s")
    return plan.recipe
