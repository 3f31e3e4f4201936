"""QuantLinear: an nn.Linear whose weight is a QTensor.

Weight-only schemes run kernels/qmatmul.py's kernels on the packed codes where they
apply (CPU, AVX-512, covered schemes, no gradients wanted); otherwise, and as the
reference, they dequantize and run a float matmul in the input's dtype.
W8A8 (int8 weights per output channel, int8 activations per token or per
tensor) runs an integer matmul (torch._int_mm, int32 accumulation) and
rescales:  y = (q_x @ q_w^T) * s_x * s_w^T + b.  Other activation schemes
fake-quantize the input (integers of any width; fp8_e4m3 per token, dynamic), then run the
weight-only path.

Devices and dtypes: lowbit runs quantized layers on the CPU (the unpacking, the
numba kernels and every test are CPU code). `module.to(...)`, `.half()`,
`.bfloat16()`, `.float()` go through QuantModule._apply (nn/base.py): a dtype cast sets the
layer's compute dtype (what `.weight` returns) and casts the bias, while the
QTensor stays exactly as stored (integer codes; scales and zero points in their
scale format), so a cast never changes the quantized weights or the saved file.
A move to any device other than the CPU (cuda, mps, meta) is refused with a
ValueError rather than leaving the codes behind.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core import QTensor, Scheme
from ..core.activations import fake_quant_fp8_per_token, fake_quant_int, int8_per_token, int8_static
from ..core.granularity import PerChannel, PerTensor, PerToken
from ..kernels import qmatmul
from .base import QuantModule
from .kernel_plan import plan


class QuantLinear(QuantModule):
    def __init__(self, qweight: QTensor, bias: torch.Tensor | None = None, act_scheme: Scheme | None = None,
                 act_scale: torch.Tensor | None = None, act_zero: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight [out, in], got shape {qweight.shape}")
        self.out_features, self.in_features = qweight.shape
        self.qweight = qweight
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        _check_act_scheme(act_scheme, act_scale)
        self.act_scheme = act_scheme
        self.register_buffer("act_scale", act_scale)
        self.register_buffer("act_zero", act_zero)
        self.dtype = dtype
        self._int8 = self._int8_weight() if act_scheme is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Module, qweight: QTensor, **kw) -> "QuantLinear":
        return cls(qweight, getattr(linear, "bias", None), dtype=_weight_dtype(linear), **kw)

    def set_activation_range(self, scale: torch.Tensor, zero: torch.Tensor | None = None) -> None:
        """Static activation quantization from now on (ranges calibrated after the weights)."""
        if self.act_scheme is None:
            raise ValueError("this layer has no activation scheme to calibrate")
        _check_act_scheme(self.act_scheme, scale)
        self.act_scale, self.act_zero = scale, zero

    def _int8_weight(self):
        """Integer weight [in, out] and per-channel scales [out] when the integer matmul applies."""
        s, a = self.qweight.scheme, self.act_scheme
        if not (s.format == "int8" and s.symmetric and isinstance(s.granularity, PerChannel)
                and s.granularity.axis in (0, -2) and s.double_quant is None and a.format == "int8"
                and a.symmetric and isinstance(a.granularity, (PerToken, PerTensor))):
            return None
        # 8-bit codes are the two's-complement bytes themselves: view them, no copy.
        q = self.qweight.codes.view(torch.int8).reshape(self.out_features, self.in_features)
        return q.t(), self.qweight.scale_values().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            # training through a frozen quantized layer (QLoRA): the forward below, run without
            # autograd; the backward dequantizes again instead of keeping W for every layer
            return _FrozenWeight.apply(x, self.bias, self)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._int8 is not None:
            return self._forward_int8(x)
        if self.act_scheme is None:  # weight-only: the packed-code kernels where they apply
            self._plan = plan(self.qweight, getattr(self, "_plan", None))
            y = qmatmul.linear(x, self._plan, self.bias)
            if y is not None:
                return y
        elif self.act_scheme.fmt.kind == "float":
            x = fake_quant_fp8_per_token(x)
        else:
            x = fake_quant_int(x, self.act_scheme.bits, self.act_scale, self.act_zero)
        # under autocast F.linear would cast the weight again: dequantize straight to its dtype
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        w = self.qweight.dequantize(dtype)
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    def _forward_int8(self, x: torch.Tensor) -> torch.Tensor:
        wq, sw = self._int8
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.act_scale is None:
            xq, sx = int8_per_token(x2)
        else:
            xq, sx = int8_static(x2, self.act_scale), self.act_scale
        y = torch._int_mm(xq, wq).float() * (sx * sw)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def quantized_nbytes(self) -> int:
        """Exact bytes of the stored weight (codes, scales, zeros), bias and activation scales."""
        n = self.qweight.nbytes
        for t in (self.bias, self.act_scale, self.act_zero):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that reads .weight, e.g. tied embeddings checks)."""
        return self.qweight.dequantize(self.dtype)

    def extra_repr(self) -> str:
        act = f", act={self.act_scheme.format}/{type(self.act_scheme.granularity).__name__}" if self.act_scheme else ""
        return f"in={self.in_features}, out={self.out_features}, {self.qweight!r}{act}"


class _FrozenWeight(torch.autograd.Function):
    """y = QuantLinear(x) with gradients for x (and the bias): dL/dx = dL/dy @ W, W dequantized in the
    backward, as bitsandbytes' 4-bit matmul does, so training holds the packed codes, not W. Fake-quantized
    activations pass the gradient straight through (STE)."""

    @staticmethod
    def forward(ctx, x, bias, layer: "QuantLinear"):
        ctx.layer, ctx.x_dtype = layer, x.dtype
        with torch.no_grad():
            return layer._forward(x)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        dtype = ctx.x_dtype
        grad_x = grad.to(dtype) @ layer.qweight.dequantize(dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(layer.bias.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_b, None


def _check_act_scheme(a: Scheme | None, scale) -> None:
    """Activation schemes the forward runs: integers (dynamic per token or calibrated), and fp8_e4m3
    per token, dynamic (llm-compressor's FP8_DYNAMIC); anything else would be run wrongly."""
    if a is None or a.fmt.kind == "int":
        return
    if a.format != "fp8_e4m3" or not isinstance(a.granularity, PerToken) or scale is not None:
        raise ValueError(f"activations {a.format}/{type(a.granularity).__name__}"
                         f"{' (static)' if scale is not None else ''}: float activations are run as fp8_e4m3 "
                         "per token, dynamic (Scheme('fp8_e4m3', PerToken()), no observer)")


def _weight_dtype(linear: nn.Module) -> torch.dtype:
    w = getattr(linear, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) else torch.float32
