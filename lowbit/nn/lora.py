"""QuantLoraLinear: peft's LoRA layer over a frozen QuantLinear (QLoRA).

peft dispatches LoRA layers by the base module's type; lowbit's QuantLinear is registered with
peft's extension point for custom modules (LoraConfig._register_custom_module), which `register`
does. The forward is peft's own LoRA Linear forward:

    y = QuantLinear(x) + scaling * B(A(dropout(x)))     A: [r, in], B: [out, r], trained; W frozen

QuantLinear gives gradients for x without keeping its dequantized weight (nn/linear.py), so
training holds the packed codes only. `merge` (peft's merge_and_unload) adds B A * scaling to the
dequantized weight and quantizes the sum again on the base's scheme (round to nearest), as peft
does for bitsandbytes and HQQ layers, keeping the base it replaced so that `unmerge` restores it
code for code; over a full-precision base (lowbit.qat.merge_lora swaps one in) it adds in place. Adapters saved with save_pretrained are standard peft adapters.

    config = register(LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(quantized_model, config)
    PeftModel.from_pretrained(fresh_quantized, path, config=register(LoraConfig.from_pretrained(path)))
"""
from __future__ import annotations

from typing import Optional

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..core import quantize
from .linear import QuantLinear


def register(config: LoraConfig) -> LoraConfig:
    """Teach `config` to wrap QuantLinear layers with QuantLoraLinear; returns the same config.
    peft keeps the mapping on the config object: register the config you load an adapter with too."""
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    return config


class QuantLoraLinear(LoraLinear):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs):
        if config.lora_bias:
            raise ValueError("QuantLoraLinear: lora_bias=True is not supported over a quantized base (the bias is "
                             "frozen with it); set lora_bias=False")
        if config.fan_in_fan_out:
            raise ValueError("QuantLoraLinear: fan_in_fan_out=True describes Conv1D weights [in, out]; a "
                             "QuantLinear's weight is [out, in]: set fan_in_fan_out=False")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(f"QuantLoraLinear runs plain LoRA; {type(variant).__name__} (DoRA and other "
                             "variants) reads the base weight as a float tensor and is not supported")
        return None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W <- W + scaling * B A for the adapters; a QuantLinear base is quantized again on its scheme
        (the base as it was is kept, so that `unmerge` gives it back code for code)."""
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if adapter_names:
            delta = sum(self.get_delta_weight(a).float() for a in adapter_names)
            unmerged = self.get_base_layer()
            self._set_base_weight(delta, safe_merge)
            if isinstance(unmerged, QuantLinear) and not self.merged_adapters:
                self._unmerged_base = [unmerged]  # a list: kept out of the module tree and state_dict
            self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Undo every merge: a QuantLinear base comes back as it was before the first merge (quantizing
        W + BA - BA again would move its codes); a float base has the deltas subtracted."""
        adapters = [a for a in self.merged_adapters if a in self.lora_A]
        unmerged = self.__dict__.pop("_unmerged_base", None)
        if unmerged is not None:
            self.base_layer = unmerged[0]
        elif adapters:
            self._set_base_weight(-sum(self.get_delta_weight(a).float() for a in adapters), False)
        self.merged_adapters = []

    def _set_base_weight(self, delta: torch.Tensor, safe: bool) -> None:
        base = self.get_base_layer()
        if isinstance(base, QuantLinear):
            w = base.qweight.dequantize() + delta
        else:
            w = base.weight.detach().float() + delta
        if safe and not torch.isfinite(w).all():
            raise ValueError("merging the LoRA adapter gives NaN/Inf weights: the adapter is broken")
        if isinstance(base, QuantLinear):
            self.base_layer = QuantLinear(quantize(w, base.qweight.scheme), base.bias, act_scheme=base.act_scheme,
                                          act_scale=base.act_scale, act_zero=base.act_zero, dtype=base.dtype)
        else:
            base.weight.data = w.to(base.weight.dtype)

    def __repr__(self) -> str:
        return "lowbit.lora." + nn.Module.__repr__(self)
