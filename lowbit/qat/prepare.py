"""prepare / convert: the two steps around a quantization-aware training run.

prepare swaps the Linear layers a recipe selects (the recipe's include/exclude/overrides, as
lowbit.quantize plans them) for FakeQuantLinear on the recipe's weight scheme, or, without a
recipe, swaps the QuantLinear layers of an already quantized model (e.g. by GPTQ) so training
starts from the solver's codes. convert swaps every FakeQuantLinear for the QuantLinear of its
current quantized weight.
"""
from __future__ import annotations

from torch import nn
from tqdm import tqdm

from ..methods import parse_method
from ..nn import QuantLinear
from ..nn.fake_quant import FakeQuantLinear
from ..pipeline import Recipe
from ..pipeline.quantize import plan
from ..pipeline.recipe import get_recipe
from ..pipeline.walk import set_module


def prepare(model: nn.Module, recipe: "Recipe | str | None" = None, *, scales: str = "dynamic",
            progress: bool = True) -> nn.Module:
    """Swap layers for FakeQuantLinear in place and return the model.

    recipe: which Linear layers, on which weight (and dynamic per-token activation) scheme; its
    round-to-nearest grid is the start. None: the model's QuantLinear layers, starting on their
    QTensors (quantize with GPTQ first, then prepare(model, scales="frozen")).
    scales: "dynamic" (refit from the weight every step), "frozen" or "learned" (LSQ step sizes).

    Example: prepare(model, "w3g64", scales="learned"); train; convert(model)
    """
    if recipe is None:
        layers = {n: m for n, m in model.named_modules() if type(m) is QuantLinear}
        if not layers:
            raise ValueError(f"prepare: {type(model).__name__} has no QuantLinear layer; give a recipe "
                             "(e.g. prepare(model, 'w3g64')) or quantize the model first")
        for name in tqdm(layers, desc="qat prepare", unit="layer", disable=not progress):
            set_module(model, name, FakeQuantLinear.from_quant(layers[name], scales=scales))
        return model
    recipe = get_recipe(recipe)
    _check_recipe(recipe)
    for name, r in tqdm(plan(model, recipe).items(), desc="qat prepare", unit="layer", disable=not progress):
        set_module(model, name, FakeQuantLinear.from_linear(model.get_submodule(name), r.weights,
                                                            act_scheme=r.activations, scales=scales))
    return model


def convert(model: nn.Module, *, progress: bool = True) -> nn.Module:
    """Swap every FakeQuantLinear for the QuantLinear of its quantized weight, in place; the model's
    outputs stay the same (within float rounding where the packed-code kernels run)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    if not layers:
        raise ValueError(f"convert: {type(model).__name__} has no FakeQuantLinear layer; run prepare() first")
    for name in tqdm(layers, desc="qat convert", unit="layer", disable=not progress):
        set_module(model, name, layers[name].to_quant())
    return model


def _check_recipe(recipe: Recipe) -> None:
    transforms, solver = parse_method(recipe.method)
    if transforms or solver != "rtn" or any(o.method not in (None, "rtn") for o in recipe.overrides):
        raise ValueError(f"prepare: recipe method {recipe.method!r}: QAT starts from round to nearest; to start "
                         "from a solver's weights, lowbit.quantize(model, recipe, calibration) first, then "
                         "prepare(model) without a recipe")
    if recipe.observer is not None or recipe.outlier_threshold is not None:
        raise ValueError("prepare: QAT fake-quantizes activations dynamically per token; recipes with an "
                         "observer (static activations) or LLM.int8() outliers are not supported")
