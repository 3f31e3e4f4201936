"""Mixture-of-experts layers as one Linear per projection per expert, so every lowbit method,
kernel and exporter that handles Linear layers handles experts too.

transformers 5 stores a block's experts fused: `gate_up_proj` [E, 2 * f, h] and `down_proj`
[E, h, f] parameters read by `forward(hidden_states, top_k_index, top_k_weights)`; 4.x had
one module of Linear layers per expert. RoutedExperts holds the 4.x shape, each expert's
gate_proj [f, h], up_proj [f, h], down_proj [h, f], and runs only the routed experts on their
tokens, as transformers does.
"""
from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One expert: act(gate_proj(x)) * up_proj(x), then down_proj."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


class RoutedExperts(nn.ModuleList):
    """Drop-in for transformers 5's fused experts module: same forward signature, experts as Linear,
    named as 4.x and the published checkpoints name them (`mlp.experts.3.down_proj`).

        experts = RoutedExperts.from_fused(block.mlp.experts)   # gate_up_proj [E, 2f, h], down_proj [E, h, f]
        y = experts(x [tokens, h], top_k_index [tokens, k], top_k_weights [tokens, k])
    """

    def __init__(self, experts: list[ExpertMLP], act_fn):
        super().__init__(experts)
        self.num_experts = len(experts)
        object.__setattr__(self, "act_fn", act_fn)  # not a child: the list holds experts only

    @classmethod
    def from_fused(cls, fused: nn.Module) -> "RoutedExperts":
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        f = gate_up.shape[1] // 2
        experts = [ExpertMLP(_linear(gate_up[e, :f]), _linear(gate_up[e, f:]), _linear(down[e]))
                   for e in range(gate_up.shape[0])]
        return cls(experts, fused.act_fn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if e >= self.num_experts:  # transformers' placeholder for a slot routed nowhere
                continue
            token, slot = torch.where(top_k_index == e)
            expert = self[e]
            x = hidden_states[token]
            y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def _linear(w: torch.Tensor) -> nn.Linear:
    """An nn.Linear holding w [out, in] (no copy)."""
    m = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
    m.weight = nn.Parameter(w, requires_grad=False)
    return m
