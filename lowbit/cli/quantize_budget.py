"""`lowbit quantize SRC --budget BITS`: the mixed-precision recipe from lowbit.search, for quantize.py."""
from __future__ import annotations

from ..analysis.mixed import DEFAULT_CANDIDATES, cost_method, plan_mixed
from ..analysis.sensitivity import layer_sensitivity
from ..methods import method_needs
from ..pipeline import Recipe
from .common import calibration_split

SENSITIVITY_WINDOWS, SENSITIVITY_WINDOW = 4, 256


def budget_recipe(model, ids, budget: float, candidates: str | None, method: str, window: int = 512,
                  calibration_windows: int = 8) -> Recipe:
    """Estimate each layer's cost (layer_sensitivity's default score: fisher for a causal LM, with a
    progress bar and ETA per pass) on 4 windows of min(256, window) tokens of `ids` (the calibration
    text) and return the recipe meeting `budget` bits per weight. A calibrated method fits on the
    windows lowbit.quantize will calibrate on (the last `calibration_windows` of `window`) and
    its costs are scored on the 4 windows just before them (a solver scored on the tokens it was
    fitted to looks far better than it is); round to nearest scores the last 4 windows."""
    names = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else list(DEFAULT_CANDIDATES)
    chain = cost_method(method, names)
    n, w = SENSITIVITY_WINDOWS, min(SENSITIVITY_WINDOW, window)
    fit, end = None, len(ids)
    if method_needs(chain):
        fit, where = calibration_split(ids, window, calibration_windows)
        end = where["token_range"][0]
    if end < n * w:
        raise ValueError(f"--budget: the calibration text has {len(ids)} tokens; the search scores "
                         f"{n} windows of {w}" + (f" before the {len(fit)} calibration windows of {window}"
                                                  if fit else "") + ": give a longer --text")
    windows = [ids[end - (i + 1) * w: end - i * w] for i in reversed(range(n))]
    sens = layer_sensitivity(model, windows, names, method=chain, solver_calibration=fit)
    plan = plan_mixed(sens, budget, method)
    print(f"mixed precision at {budget:g} bits/weight: {plan.bits_per_weight:.4f} over the blocks' layers "
          f"({plan.nbytes} of {plan.budget_bytes} bytes), "
          + ", ".join(f"{k} x{v}" for k, v in sorted(plan.counts().items()))
          + f"; costs {'estimated from one backward pass (fisher)' if sens.score == 'fisher' else 'measured'}"
          f" in {sens.seconds:.0f} s")
    return plan.recipe
