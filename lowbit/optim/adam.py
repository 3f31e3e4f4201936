"""One Adam for 32-bit and 8-bit state (Kingma & Ba 2015; decoupled weight decay as AdamW,
Loshchilov & Hutter 2019; 8-bit block-wise state as Dettmers et al. 2022).

    opt = AdamW8bit(model.parameters(), lr=1e-4, weight_decay=0.01)

The update math is written once (`adam_math`); the 8-bit path decodes both moments to
float32, runs the same math, and rounds them back: the first moment to the signed dynamic
map, the second to the unsigned one (a positive second moment never to 0: see
blockwise.quantize_second_moment), each block of 2048 scaled by its absmax. Tensors under
`min_8bit_size` (4096) elements keep 32-bit state, as bitsandbytes does. A parameter group's
`state_bits`, or a parameter's `optim_bits` attribute (StableEmbedding sets 32 on its weight),
overrides the optimizer's choice. bf16 parameters are updated in float32 and written back with
round-to-nearest, or unbiased stochastic rounding with `stochastic_rounding=True`.
On the CPU a fused numba kernel (lowbit/kernels/adam8bit.py) runs the 8-bit step for float32
parameters; the torch path here is its reference.
"""
from __future__ import annotations

import math

import torch

from ..core.rounding import stochastic_round_bf16
from ..kernels.adam8bit import adam8bit_step
from .blockwise import BLOCK, SIGNED, UNSIGNED, dequantize_blockwise, quantize_blockwise, quantize_second_moment

STATE_BITS = (8, 32)
MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit state, as bitsandbytes does
STATE_DTYPES = {"m_codes": torch.uint8, "v_codes": torch.uint8, "m_absmax": torch.float32,
                "v_absmax": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32}


def adam_math(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, step: int, lr: float,
              beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool) -> None:
    """One Adam(W) step on float32 tensors of one shape, in place on p, m and v (torch.optim.AdamW's
    single-tensor formula: m <- lerp(m, g, 1 - b1), v <- b2 v + (1 - b2) g^2,
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps))."""
    if weight_decay:
        if decoupled:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))


class Adam(torch.optim.Optimizer):
    """Adam with 32-bit or block-wise 8-bit state; `decoupled=True` is AdamW.

    params: as torch.optim; a group may set `state_bits`. state_bits: 8 or 32.
    min_8bit_size: tensors with fewer elements keep 32-bit state.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, decoupled: bool = False, state_bits: int = 32,
                 min_8bit_size: int = MIN_8BIT_SIZE, stochastic_rounding: bool = False, use_kernel: bool = True):
        if state_bits not in STATE_BITS:
            raise ValueError(f"Adam: state_bits must be 8 or 32, got {state_bits!r}")
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"Adam: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Adam: betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                        state_bits=state_bits, min_8bit_size=min_8bit_size, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        self.use_kernel = use_kernel

    def state_bits_of(self, p: torch.Tensor, group: dict) -> int:
        """32 for small tensors and for parameters that ask for it (`p.optim_bits`), else the group's bits."""
        bits = getattr(p, "optim_bits", group["state_bits"])
        if bits not in STATE_BITS:
            raise ValueError(f"Adam: a parameter's optim_bits / a group's state_bits must be 8 or 32, got {bits!r}")
        return 32 if p.numel() < group["min_8bit_size"] else bits

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("Adam: sparse gradients are not supported")
                self._step_one(p, group)
        return loss

    def _step_one(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            self._init_state(p, group, state)
        state["step"] += 1
        b1, b2 = group["betas"]
        hyper = dict(step=int(state["step"].item()), lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"],
                     weight_decay=group["weight_decay"], decoupled=group["decoupled"])
        if "exp_avg" in state:  # 32-bit state
            p32 = p if p.dtype == torch.float32 else p.float()
            adam_math(p32, p.grad.float(), state["exp_avg"], state["exp_avg_sq"], **hyper)
        else:
            if self.use_kernel and adam8bit_step(
                    p.data, p.grad, state["m_codes"], state["m_absmax"], state["v_codes"], state["v_absmax"],
                    SIGNED, UNSIGNED, BLOCK, **hyper):
                return
            p32 = p if p.dtype == torch.float32 else p.float()
            m = dequantize_blockwise(state["m_codes"], state["m_absmax"], SIGNED, p.numel()).view_as(p)
            v = dequantize_blockwise(state["v_codes"], state["v_absmax"], UNSIGNED, p.numel()).view_as(p)
            adam_math(p32, p.grad.float(), m, v, **hyper)
            state["m_codes"], state["m_absmax"] = quantize_blockwise(m, SIGNED)
            state["v_codes"], state["v_absmax"] = quantize_second_moment(v)
        if p32 is not p:
            p.copy_(stochastic_round_bf16(p32) if group["stochastic_rounding"] and p.dtype == torch.bfloat16 else p32)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim's, except that state keeps the dtypes it was saved in.

        torch casts every floating state tensor to its parameter's dtype: uint8 codes would turn
        into floats, and for bf16/fp16 parameters the float32 absmax and moments would lose bits
        (an fp16 v_absmax under 6e-8 becomes 0, the failure quantize_second_moment rules out), so a
        resumed run would differ from an uninterrupted one. The saved tensors are taken again,
        uncast, once torch has matched them to the parameters.
        """
        super().load_state_dict(state_dict)
        saved_ids = (i for group in state_dict["param_groups"] for i in group["params"])
        params = (p for group in self.param_groups for p in group["params"])
        for param_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(param_id, {})
            for key, dtype in STATE_DTYPES.items():
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=dtype)

    def _init_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        state["step"] = torch.tensor(0.0)
        if self.state_bits_of(p, group) == 32:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            return
        zero = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        state["m_codes"], state["m_absmax"] = quantize_blockwise(zero, SIGNED)
        state["v_codes"], state["v_absmax"] = quantize_blockwise(zero, UNSIGNED)


class AdamW8bit(Adam):
    """AdamW with 8-bit block-wise state: `AdamW8bit(params, lr, betas, eps, weight_decay=1e-2)`."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled=True, state_bits=kwargs.pop("state_bits", 8),
                         **kwargs)


class Adam8bit(Adam):
    """Adam (L2 weight decay added to the gradient) with 8-bit block-wise state."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled=False, state_bits=kwargs.pop("state_bits", 8),
                         **kwargs)


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in an optimizer's state (codes, absmax, moments; step counters included)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))
