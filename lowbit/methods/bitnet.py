"""BitNet b1.58 (Ma et al., 2024): ternary weights {-1, 0, +1} and int8 activations.

    gamma   = mean |W|                               (absmean, one fp32 scale per tensor)
    W~      = RoundClip(W / gamma, -1, +1)           (stored as 2-bit codes, 4 per byte)
    x~      = Clip(round(x * 127 / absmax(x)))       (per token, dynamic)
    y       = (x~ @ W~^T) * gamma * absmax(x) / 127  (+ bias)

x~ @ W~^T is a sum of at most `in` products of an int8 and a ternary value: additions only, and
exact in float32 while 127 * in < 2^24 (every layer of a model narrower than 132,000 inputs).
Binary (XNOR-Net: sign(W) times a per-channel mean |W|) and ternary weight-only recipes use the
same absmean rule through the ordinary Scheme; only BitNet changes the forward.
"""
from __future__ import annotations

import torch

from ..core import PerTensor, PerToken, QTensor, Scheme
from ..core.activations import int8_per_token

BITNET_WEIGHTS = Scheme("ternary", PerTensor(), range="absmean")
BITNET_ACTIVATIONS = Scheme("int8", PerToken())


def is_bitnet(weights: Scheme, activations: Scheme | None) -> bool:
    """True for BitNet b1.58's pair: ternary absmean weights per tensor, dynamic int8 per token."""
    return (weights.format == "ternary" and isinstance(weights.granularity, PerTensor) and weights.range == "absmean"
            and activations is not None and activations.format == "int8" and activations.symmetric
            and isinstance(activations.granularity, PerToken))


def ternary_values(q: QTensor) -> torch.Tensor:
    """The ternary weight W~ in {-1, 0, +1} as int8 [out, in] (the codebook indices mapped to values)."""
    if q.scheme.format != "ternary":
        raise ValueError(f"ternary_values needs a ternary QTensor, got format {q.scheme.format!r}")
    return (q.unpack_codes().to(torch.int8) - 1)  # codebook [-1, 0, 1]: index - 1


def bitlinear(x: torch.Tensor, w_ternary: torch.Tensor, gamma: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., in], w_ternary: int8 [out, in] in {-1, 0, 1}, gamma: scalar -> y [..., out] in x's dtype."""
    shape = x.shape
    xq, sx = int8_per_token(x.reshape(-1, shape[-1]))
    y = (xq.float() @ w_ternary.float().t()) * (sx * gamma.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], w_ternary.shape[0])
