"""SharedLinear: a Linear whose weight is a pruned k-means codebook lookup (Deep Compression).

Holds the trainable centroids C [k] and the fixed codes uint8 [out, in] (k = pruned); the weight
is methods.deep_compression.shared_weight(C, codes) = [C, 0][codes], so training it updates the
centroids only, each by the sum of its weights' gradients, as the paper fine-tunes them.

    layer = SharedLinear.from_linear(linear, *share_weights(linear.weight, mask, bits=4))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.deep_compression import shared_weight


class SharedLinear(nn.Module):
    def __init__(self, centroids: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if codes.dtype != torch.uint8 or codes.dim() != 2 or centroids.dim() != 1:
            raise ValueError(f"SharedLinear needs centroids [k] and uint8 codes [out, in], got {tuple(centroids.shape)}"
                             f" and {codes.dtype} {tuple(codes.shape)}")
        self.centroids = nn.Parameter(centroids.detach().float().clone())
        self.register_buffer("codes", codes)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = codes.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, centroids: torch.Tensor, codes: torch.Tensor) -> "SharedLinear":
        if tuple(codes.shape) != tuple(linear.weight.shape):
            raise ValueError(f"codes {tuple(codes.shape)} do not match the Linear's weight {tuple(linear.weight.shape)}")
        return cls(centroids, codes, linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        return shared_weight(self.centroids, self.codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, clusters={self.centroids.numel()}"
