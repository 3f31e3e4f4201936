"""Finding the layers a recipe quantizes and swapping modules in place."""
from __future__ import annotations

import torch
from torch import nn


def is_linear(m: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), whose weight is stored [in, out]."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def is_norm(m: nn.Module) -> bool:
    """LayerNorm / RMSNorm-like modules with a per-channel weight (an equivalence transform's fold target)."""
    return type(m).__name__.endswith("Norm") and isinstance(getattr(m, "weight", None), torch.Tensor)


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The weight as [out, in] whatever the module's own layout."""
    w = m.weight.detach()
    return w.t() if type(m).__name__ == "Conv1D" else w


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
