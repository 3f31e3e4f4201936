"""merge_lora: fold LoRA adapters over QuantLinear layers into full-precision or re-quantized weights."""
from __future__ import annotations

import torch
from torch import nn

from ..nn import QuantLinear
from ..pipeline import Recipe
from ..pipeline.quantize import quantize
from ..pipeline.recipe import get_recipe


def merge_lora(model: nn.Module, requantize: "Recipe | str | None" = None, *, progress: bool = False) -> nn.Module:
    """A peft model with LoRA over lowbit QuantLinear layers -> the plain model, adapters merged.

    requantize=None: each adapted layer becomes an nn.Linear holding dequantize(W) + scaling * B A
    (float32). A recipe: those layers are then quantized with it (lowbit.quantize, round to nearest
    or the recipe's method without calibration), the other layers are left as they are.
    peft's own merge_and_unload() instead re-quantizes each layer on its base scheme.

    Example: merged = merge_lora(peft_model, requantize="nf4-dq")
    """
    from ..nn.lora import QuantLoraLinear

    if not hasattr(model, "merge_and_unload"):
        raise ValueError(f"merge_lora needs a peft model (get_peft_model / PeftModel.from_pretrained), "
                         f"got {type(model).__name__}")
    adapted = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLoraLinear)]
    if not adapted:
        raise ValueError("merge_lora: the model has no LoRA layer over a QuantLinear (lowbit.nn.lora.register "
                         "the LoraConfig before get_peft_model)")
    for _, m in adapted:  # a full-precision base: peft's merge then adds the adapters in place
        base = m.get_base_layer()
        if isinstance(base, QuantLinear):
            m.base_layer = _dequantized(base)
    merged = model.merge_and_unload(progressbar=progress)
    if requantize is not None:
        prefix = "base_model.model."
        names = tuple(n[len(prefix):] if n.startswith(prefix) else n for n, _ in adapted)
        recipe = get_recipe(requantize).replace(include=names, exclude=(), overrides=(), embeddings=None, output=None)
        quantize(merged, recipe, progress=progress)
    return merged


def _dequantized(layer: QuantLinear) -> nn.Linear:
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(layer.qweight.dequantize())
        if layer.bias is not None:
            lin.bias.copy_(layer.bias.float())
    return lin.requires_grad_(False)
