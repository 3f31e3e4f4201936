"""Mixture-of-experts blocks made quantizable, and an account of what a quantization left in float.

unfuse_experts replaces transformers 5's fused expert tensors with one Linear per projection per
expert (nn.RoutedExperts), so every method, the calibration runner and every exporter see experts
as the Linear layers they already handle. coverage() counts what was quantized, so nothing stays
float without a word.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import RoutedExperts
from .walk import set_module

FUSED_FORWARD = ["hidden_states", "top_k_index", "top_k_weights"]


def is_fused_experts(m: nn.Module) -> bool:
    """transformers 5's experts layout: gate_up_proj [E, 2f, h], down_proj [E, h, f], forward(x, index, weights)."""
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == down.dim() == 3):
        return False
    e, two_f, h = gu.shape
    biased = any(p.dim() < 3 for p in m.parameters(recurse=False))
    return (list(inspect.signature(m.forward).parameters)[:3] == FUSED_FORWARD and two_f % 2 == 0
            and tuple(down.shape) == (e, h, two_f // 2) and hasattr(m, "act_fn") and not biased)


def unfuse_experts(model: nn.Module, covered=lambda name: True) -> list[str]:
    """Replace every fused experts module whose experts `covered(name)` says are quantized; -> their names."""
    names = [n for n, m in model.named_modules() if is_fused_experts(m) and covered(n)]
    for n in names:
        set_module(model, n, RoutedExperts.from_fused(model.get_submodule(n)))
    return names


def is_router(name: str, m: nn.Module) -> bool:
    """A mixture-of-experts router (kept in float by design, as llama.cpp and every peer keep it)."""
    return type(m).__name__.endswith("Router") or (name.endswith(".gate") and not name.endswith("experts.gate"))


@dataclass
class Coverage:
    """Parameters quantized against all weight parameters (matrices and larger; norms and biases
    are not counted), and the float ones by name."""
    quantized: int = 0
    total: int = 0
    float_weights: dict[str, int] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.quantized / max(self.total, 1)

    def summary(self) -> str:
        kept = sorted(self.float_weights.items(), key=lambda kv: -kv[1])
        names = ", ".join(f"{n} ({c / 1e6:.2f}M)" for n, c in kept[:4]) + (f", ... ({len(kept)} in all)"
                                                                          if len(kept) > 4 else "")
        return (f"quantized {self.share:.1%} of {self.total / 1e6:.2f}M weight parameters"
                + (f"; in float: {names}" if kept else ""))


def coverage(model: nn.Module) -> Coverage:
    """What lowbit.quantize left in float: every parameter of 2 or more dimensions not held as codes."""
    c = Coverage()
    seen = set()
    for name, m in model.named_modules():
        q = getattr(m, "qweight", None)
        if q is not None and id(q) not in seen:
            seen.add(id(q))
            n = int(torch.Size(q.shape).numel())
            c.quantized += n
            c.total += n
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() >= 2 and id(p) not in seen:
                seen.add(id(p))
                c.total += p.numel()
                c.float_weights[f"{name}.{pname}" if name else pname] = p.numel()
    return c
