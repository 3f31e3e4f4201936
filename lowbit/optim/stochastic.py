"""bf16 weights, float32 updates: a wrapper that lets any torch optimizer train bf16 parameters
without losing small steps.

An update smaller than half a bf16 ulp of the weight (2^-9 of it) vanishes under
round-to-nearest, so with a small learning rate bf16 training stalls. The wrapper lifts each
bf16 parameter to float32 for the inner optimizer's step (its state is then float32 too) and
writes the result back with unbiased stochastic rounding (Gupta et al. 2015): in expectation the
stored weight moves by exactly the update. `rounding="nearest"` writes back with
round-to-nearest instead, the baseline that stalls.

    opt = StochasticRounding(torch.optim.AdamW(model.parameters(), lr=1e-5))
"""
from __future__ import annotations

import torch

from ..core.rounding import stochastic_round_bf16

ROUNDINGS = ("stochastic", "nearest")


class StochasticRounding:
    """Wraps `optimizer`; bf16 parameters with gradients get float32 math and rounded write-back."""

    def __init__(self, optimizer: torch.optim.Optimizer, rounding: str = "stochastic",
                 generator: torch.Generator | None = None):
        if rounding not in ROUNDINGS:
            raise ValueError(f"StochasticRounding: rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.optimizer, self.rounding, self.generator = optimizer, rounding, generator

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        lifted = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.dtype == torch.bfloat16:
                    lifted.append((p, p.data, p.grad))
                    p.data = p.data.float()
                    p.grad = p.grad.float()
        try:
            return self.optimizer.step(closure)
        finally:
            for p, bf16, grad in lifted:
                p32 = p.data
                bf16.copy_(stochastic_round_bf16(p32, self.generator) if self.rounding == "stochastic" else p32)
                p.data, p.grad = bf16, grad
