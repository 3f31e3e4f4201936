"""FakeQuantLinear: an nn.Linear that trains while its forward sees the quantized weight (QAT).

    forward:   y = x' @ Q(W)^T + b,   Q(W) = dequantize(quantize(W))   (any lowbit Scheme)
    backward:  dL/dW = dL/dQ(W)        (straight-through estimator: rounding counts as identity)

x' is x fake-quantized per token when an activation scheme is given (dynamic int or fp8_e4m3,
as QuantLinear runs them), again with a straight-through gradient. Where the scales come from:

    "dynamic"  refitted from the current W at every step (the scheme's range rule): round to nearest
    "frozen"   fixed at the start (fit_params, or a solver's QTensor such as GPTQ's): W moves on a fixed grid
    "learned"  LSQ (Esser et al. 2020): the step sizes s are parameters. Inside the grid
               dQ/ds = q - v/s, clipped elements give dQ/ds = q (q: the grid value, zero point
               subtracted; v = w/s); each group's gradient is scaled by g = 1 / sqrt(N * Q_P),
               N the elements sharing the step and Q_P the format's largest value. Clipped weights
               get no gradient (LSQ's clipped STE).

`to_quant()` gives the QuantLinear whose stored QTensor is exactly the forward's Q(W): its
outputs equal this module's (the packed-code kernels sum in another order: float rounding).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core import QTensor, Scheme, fit_params, quantize, quantize_with
from ..core import scales as scale_store
from ..core.activations import fake_quant_fp8_per_token, fake_quant_int
from ..core.granularity import GroupView, PerToken
from ..core.grid import encode_part
from .linear import QuantLinear

SCALES = ("dynamic", "frozen", "learned")


class FakeQuantLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: Scheme, *,
                 act_scheme: Scheme | None = None, scales: str = "dynamic", params: QTensor | None = None):
        """weight: [out, in] float; params: the starting grid (a QTensor's scales and zero points;
        default fit_params(weight, scheme)), used by scales="frozen" and "learned"."""
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"FakeQuantLinear needs a 2-D weight [out, in], got shape {tuple(weight.shape)}")
        _check(scheme, act_scheme, scales)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.scheme, self.act_scheme, self.scales = scheme, act_scheme, scales
        self.params = None
        if scales != "dynamic":
            self.params = params if params is not None else fit_params(self.weight.detach(), scheme)
            if tuple(self.params.shape) != tuple(weight.shape):
                raise ValueError(f"params fitted for shape {self.params.shape}, weight is {tuple(weight.shape)}")
        if scales == "learned":
            self.step = nn.Parameter(self.params.scale_values().detach().clone())  # [stats shape] fp32

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme: Scheme, **kw) -> "FakeQuantLinear":
        """From nn.Linear (or transformers' Conv1D, weight [in, out])."""
        w = linear.weight.detach()
        w = w.t() if type(linear).__name__ == "Conv1D" else w
        return cls(w, getattr(linear, "bias", None), scheme, **kw)

    @classmethod
    def from_quant(cls, layer: QuantLinear, scales: str = "frozen") -> "FakeQuantLinear":
        """From a QuantLinear (e.g. GPTQ's): W starts at its dequantized weight; "frozen" and
        "learned" start on its scales and zero points, so Q(W) is its QTensor exactly."""
        if layer.act_scale is not None:
            raise ValueError("QAT runs dynamic activation quantization only; this layer has static "
                             "(calibrated) activation scales")
        q = layer.qweight
        return cls(q.dequantize(layer.dtype), layer.bias, q.scheme, act_scheme=layer.act_scheme, scales=scales,
                   params=None if scales == "dynamic" else q)

    # -- the quantized weight ------------------------------------------------------------------
    def qtensor(self) -> QTensor:
        """Q(W) as a QTensor (codes of the current weight on the current grid)."""
        w = self.weight.detach()
        if self.scales == "dynamic":
            return quantize(w, self.scheme)
        if self.scales == "frozen":
            return quantize_with(w, self.params)
        fmt = self.scheme.scale_format
        return quantize_with(w, QTensor(self.params.codes, self.params.shape, self.scheme,
                                        scales=scale_store.store(_stored(self.step.detach(), fmt), fmt),
                                        zeros=self.params.zeros))

    def quantized_weight(self) -> torch.Tensor:
        """Q(W) [out, in] in the weight's dtype, differentiable (STE; LSQ for learned scales)."""
        if self.scales == "learned":
            s = _STE.apply(self.step, _stored(self.step, self.scheme.scale_format))  # the scale as stored
            return _LSQ.apply(self.weight, s, self.params.zero_values(), self.scheme).to(self.weight.dtype)
        return _STE.apply(self.weight, self.qtensor().dequantize(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_scheme is not None:
            x = _STE.apply(x, _fake_quant_act(x.detach(), self.act_scheme))
        return F.linear(x, self.quantized_weight().to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)

    def to_quant(self) -> QuantLinear:
        """The real quantized layer: QuantLinear over Q(W), same bias and activation scheme."""
        return QuantLinear(self.qtensor(), self.bias, act_scheme=self.act_scheme, dtype=self.weight.dtype)

    def extra_repr(self) -> str:
        act = f", act={self.act_scheme.format}" if self.act_scheme else ""
        return (f"in={self.in_features}, out={self.out_features}, {self.scheme.name or self.scheme.format}/"
                f"{self.scheme.granularity}, scales={self.scales}{act}")


def _check(scheme: Scheme, act: Scheme | None, scales: str) -> None:
    if scales not in SCALES:
        raise ValueError(f"scales={scales!r}: choose one of {', '.join(SCALES)}")
    if scheme.is_learned and scales != "dynamic":
        raise ValueError(f"{scheme.format!r} learns a codebook per group: QAT supports it with scales='dynamic' only")
    if scales == "learned" and (scheme.double_quant is not None or scheme.tensor_scale or scheme.rounding != "nearest"):
        raise ValueError(f"scales='learned' (LSQ) needs plain scales rounded to nearest; scheme "
                         f"{scheme.name or scheme.format} has double-quantized scales, a tensor scale or stochastic "
                         "rounding: use scales='frozen' or 'dynamic'")
    if act is not None and not isinstance(act.granularity, PerToken):
        raise ValueError(f"activations {act.format}/{act.granularity}: QAT fake-quantizes activations dynamically "
                         "per token (Scheme('int8', PerToken()) or Scheme('fp8_e4m3', PerToken()))")
    if act is not None and act.fmt.kind != "int" and act.format != "fp8_e4m3":
        raise ValueError(f"activations {act.format}: integers or fp8_e4m3 per token")


def _fake_quant_act(x: torch.Tensor, a: Scheme) -> torch.Tensor:
    """What QuantLinear does to its input (dynamic, per token)."""
    return fake_quant_fp8_per_token(x) if a.fmt.kind == "float" else fake_quant_int(x, a.bits)


def _stored(s: torch.Tensor, scale_format: str) -> torch.Tensor:
    """Positive scales rounded to the scale format, as float32 (what a QTensor reads back)."""
    s = s.detach().float().clamp(min=torch.finfo(torch.float32).tiny)  # a step trained to <= 0 stays positive
    return scale_store.load(scale_store.store(scale_store.round_to(s, scale_format), scale_format), scale_format)


class _STE(torch.autograd.Function):
    """Returns `quantized` exactly; the gradient passes to `x` unchanged."""

    @staticmethod
    def forward(ctx, x, quantized):
        return quantized

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _LSQ(torch.autograd.Function):
    """Q(w) on the grid of step sizes s [stats shape] (and fixed zero points z), with LSQ's gradients."""

    @staticmethod
    def forward(ctx, w, s, z, scheme: Scheme):
        view, fmt = GroupView(tuple(w.shape), scheme.granularity), scheme.fmt
        parts = view.parts(w.detach() if w.dtype == torch.float64 else w.detach().float())
        s_cols = view.split_stats(s.detach())
        z_cols = view.split_stats(z) if z is not None else [None] * len(parts)
        out, inside, ds = [], [], []
        for x, sc, zc in zip(parts, s_cols, z_cols):
            sc = sc.to(x.dtype)
            v = x / sc if zc is None else x / sc + zc   # position on the grid
            q = fmt.decode(encode_part(x, sc, zc, fmt)).to(x.dtype)
            q = q if zc is None else q - zc              # grid value, zero point subtracted
            keep = (v >= fmt.min) & (v <= fmt.max)
            out.append(q * sc)
            inside.append(keep)
            ds.append(q - keep * (x / sc))               # dQ/ds per element
        ctx.view, ctx.s_dtype = view, s.dtype
        # LSQ's gradient scale: 1 / sqrt(elements per step * Q_P)
        ctx.g = 1.0 / math.sqrt(max(1, w.numel() // max(1, s.numel())) * fmt.max)
        ctx.save_for_backward(view.merge(inside), view.merge(ds))
        return view.merge(out)

    @staticmethod
    def backward(ctx, grad):
        inside, ds = ctx.saved_tensors
        view = ctx.view
        grad_w = grad * inside
        per_group = [p.sum(dim=1) for p in view.parts((grad * ds).to(ds.dtype))]
        grad_s = view.merge_stats(per_group).to(ctx.s_dtype) * ctx.g
        return grad_w, grad_s, None, None
