"""A model quantized for a llama.cpp file type with calibrated codes (pipeline/gguf_calibrated.py).

    quantize_gguf(model, "q4_k_m", calibration)      # every Linear of the blocks gets its llama.cpp type
    lowbit.save(model, "model.gguf")                  # writes the solved blocks as they are
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

from ...pipeline.gguf_calibrated import solve_ggml
from ...pipeline.walk import is_linear
from .mixtures import file_type
from .arch import gguf_name, model_arch, n_expert

FLOAT_TYPES = ("f32", "f16", "bf16")


def tensor_types(model: nn.Module, recipe: str) -> dict[str, str]:
    """{Linear module name: the GGML type llama.cpp's quantizer gives its weight} for the quantized ones."""
    config, arch = model_arch(model)
    ft = file_type(recipe)
    tied = getattr(config, "tie_word_embeddings", False)
    n_gqa = config.num_attention_heads // config.num_key_value_heads
    out = {}
    for name, m in model.named_modules():
        if not is_linear(m) or name == "lm_head":
            continue
        gname, layer = gguf_name(f"{name}.weight", arch)
        t = ft.tensor_type(gname, ne0=m.in_features, layer=layer, n_layer=config.num_hidden_layers, n_gqa=n_gqa,
                           has_output=not tied, arch=arch.gguf, n_expert=n_expert(config))
        if t not in FLOAT_TYPES:
            out[name] = t
    return out


def quantize_gguf(model: nn.Module, recipe: str, calibration: Iterable, **options) -> nn.Module:
    """Solve every Linear of `model`'s blocks on the GGML type llama.cpp gives it in file type `recipe`
    (options: pipeline.gguf_calibrated.solve_ggml's: method, damp, act_order, ...), in place;
    lowbit.save(model, "x.gguf") then writes that file type with the solved blocks."""
    solve_ggml(model, tensor_types(model, recipe), calibration, **options)
    model.lowbit_gguf_recipe = recipe
    return model
