"""BitLinear (BitNet b1.58): ternary weights packed 2 bits each, int8 activations per token.

Stored: the ternary QTensor (2-bit codes, 4 per byte, plus one fp32 scale gamma) and the bias;
the forward is methods/bitnet.py's `bitlinear` (integer activations times {-1, 0, +1}, then one
rescale by gamma and the token's absmax / 127). `lowbit.quantize(model, "bitnet")` builds these.

    layer = BitLinear.from_linear(linear, lowbit.quantize_tensor(linear.weight, BITNET_WEIGHTS))
"""
from __future__ import annotations

import torch

from ..core import QTensor, Scheme
from ..methods.bitnet import BITNET_ACTIVATIONS, bitlinear, is_bitnet, ternary_values
from .linear import QuantLinear


class BitLinear(QuantLinear):
    def __init__(self, qweight: QTensor, bias: torch.Tensor | None = None,
                 act_scheme: Scheme | None = BITNET_ACTIVATIONS, dtype: torch.dtype = torch.float32, **unused):
        if unused.get("act_scale") is not None or not is_bitnet(qweight.scheme, act_scheme):
            raise ValueError(f"BitLinear runs BitNet b1.58: ternary absmean weights per tensor and dynamic int8 "
                             f"activations per token; got weights {qweight.scheme.format}/"
                             f"{type(qweight.scheme.granularity).__name__}/{qweight.scheme.range} and activations "
                             f"{act_scheme}")
        super().__init__(qweight, bias, act_scheme=act_scheme, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitlinear(x, ternary_values(self.qweight), self.qweight.scale_values(), self.bias)
