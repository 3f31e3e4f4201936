"""lowbit.quantize(model, recipe): quantize a torch model in place.

1. pick the Linear-like modules the recipe covers (include/exclude/overrides);
2. static activation recipes: run the calibration batches through the model
   with an observer on each selected module's input, then fix the ranges;
3. replace each module with a QuantLinear holding the method's QTensor.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from ..core.observers import make_observer
from ..methods import get_method
from ..nn import QuantLinear
from .recipe import Recipe, get_recipe
from .walk import is_linear, linear_weight, set_module


def plan(model: nn.Module, recipe: Recipe) -> dict[str, Recipe]:
    """{module name: the recipe that applies to it} for every module that will be quantized."""
    out = {}
    for name, m in model.named_modules():
        r = recipe.for_module(name) if name else None
        if r is None:
            continue
        if is_linear(m):
            out[name] = r
        elif _named_explicitly(name, recipe):
            raise ValueError(f"module {name!r} ({type(m).__name__}) cannot be quantized: lowbit quantizes "
                             "Linear layers; change the recipe's include patterns")
    if not out:
        raise ValueError(f"recipe {recipe.name or ''!r} matches no Linear layer of {type(model).__name__}; "
                         f"include={list(recipe.include)}, exclude={list(recipe.exclude)}")
    return out


def _named_explicitly(name: str, recipe: Recipe) -> bool:
    return name in recipe.include or any(o.pattern == name and not o.skip for o in recipe.overrides)


def quantize(model: nn.Module, recipe: "Recipe | str", calibration: Iterable | None = None, *,
             method: str | None = None, progress: bool = True) -> nn.Module:
    """Quantize `model` in place and return it.

    `calibration`: an iterable of input batches (token id tensors [batch, seq], or dicts
    of model inputs), needed for static activation recipes.
    """
    recipe = get_recipe(recipe, method)
    targets = plan(model, recipe)
    act_ranges = _calibrate(model, targets, calibration, progress) if recipe.observer else {}
    bar = tqdm(targets.items(), desc="quantize", unit="layer", disable=not progress)
    for name, r in bar:
        old = model.get_submodule(name)
        qweight = get_method(r.method)(linear_weight(old).float(), r.weights)
        scale, zero = act_ranges.get(name, (None, None))
        new = QuantLinear.from_linear(old, qweight, act_scheme=r.activations, act_scale=scale, act_zero=zero)
        set_module(model, name, new)
    model.lowbit_recipe = recipe
    return model


@torch.no_grad()  # not inference_mode: the scales it makes must be usable outside it
def _calibrate(model, targets: dict[str, Recipe], calibration, progress):
    if calibration is None:
        raise ValueError("this recipe quantizes activations statically: pass calibration=batches of inputs")
    observers = {n: make_observer(r.observer) for n, r in targets.items()}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: observers[n].update(args[0])) for n in targets]
    try:
        batches = list(calibration)
        if not batches:
            raise ValueError("calibration is empty: give at least one batch")
        for b in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
            model(**b) if isinstance(b, dict) else model(b)
    finally:
        for h in hooks:
            h.remove()
    ranges = {}
    for n, r in targets.items():
        a = r.activations
        levels = 2**a.bits
        lo, hi = observers[n].range(a.symmetric, levels)
        if a.symmetric:
            qmax = 2 ** (a.bits - 1) - 1
            ranges[n] = (torch.tensor(max(hi, 1e-8) / qmax), None)
        else:
            s = max(hi - lo, 1e-8) / (levels - 1)
            ranges[n] = (torch.tensor(s), torch.tensor(round(-lo / s)))
    return ranges
