"""Round to nearest: the baseline every other method is measured against."""
from __future__ import annotations

import torch

from ..core import QTensor, Scheme, quantize


def rtn(w: torch.Tensor, scheme: Scheme) -> QTensor:
    """w: [out, in] -> QTensor; the scheme's range rule (absmax, minmax, mse, ...) picks the scales."""
    return quantize(w, scheme)


def mse_clip(w: torch.Tensor, scheme: Scheme) -> QTensor:
    """Round to nearest after a per-group search of the clipping range (never worse than RTN in MSE)."""
    return quantize(w, scheme.replace(range="mse", name=None))
