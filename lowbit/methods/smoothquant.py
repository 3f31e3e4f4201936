"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights.

For a group of Linear layers reading the same input X, per input channel j

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (W_j: column j of every layer)

and X / s, W * s compute the same product; with alpha ~ 0.5 both become easy
to quantize to int8. The pipeline folds 1/s into the layer that produces X
(a norm's weight, or the rows of a preceding Linear), so the model is
unchanged before quantization.
"""
from __future__ import annotations

import torch


def smoothquant_scales(weights: list[torch.Tensor], stats, scheme=None, *, alpha: float = 0.5) -> torch.Tensor:
    """weights: [out_i, in] of the layers sharing the input; stats.absmax: [in] -> s: [in]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant alpha={alpha} must lie in [0, 1]")
    wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).float()
    xmax = stats.absmax.float()
    s = xmax.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
    # channels that never fire (or weights that are all zero) keep their scale
    return torch.where((xmax > 0) & (wmax > 0), s, torch.ones_like(s)).clamp(min=1e-5, max=1e5)


smoothquant_scales.needs = ("absmax",)
