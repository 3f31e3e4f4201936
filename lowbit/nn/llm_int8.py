"""LLMInt8Linear: QuantLinear's W8A8 integer path plus LLM.int8()'s outlier columns in full precision.

Stored: exactly what a w8a8-dynamic QuantLinear stores (int8 codes [out, in], fp32 scale per
output channel, bias); the outlier part multiplies by the dequantized int8 weight columns, as
bitsandbytes does (`subB = CB[:, outlier_cols] * SCB / 127`), so no extra bytes are held.

    y = QuantLinear int8 path(x with the outlier columns zeroed) + x[:, O] @ W_deq[:, O]^T

Each module counts the outlier columns it has seen; `outlier_stats(model)` sums them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core import QTensor, Scheme
from ..methods.llm_int8 import DEFAULT_THRESHOLD, check_threshold, decompose, outlier_columns
from .linear import QuantLinear


class LLMInt8Linear(QuantLinear):
    def __init__(self, qweight: QTensor, bias: torch.Tensor | None = None, act_scheme: Scheme | None = None,
                 act_scale: torch.Tensor | None = None, act_zero: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, threshold: float = DEFAULT_THRESHOLD):
        if act_scheme is None or act_scale is not None or act_zero is not None:
            raise ValueError("LLM.int8() quantizes activations dynamically per token: give "
                             "act_scheme=Scheme('int8', PerToken()) and no act_scale/act_zero")
        super().__init__(qweight, bias, act_scheme=act_scheme, dtype=dtype)
        if self._int8 is None:
            raise ValueError(f"LLM.int8() needs symmetric int8 weights per output channel and symmetric int8 "
                             f"activations per token; got weights {qweight.scheme.format}/"
                             f"{type(qweight.scheme.granularity).__name__}, activations {act_scheme.format}/"
                             f"{type(act_scheme.granularity).__name__} (use the 'llm-int8' recipe)")
        self.threshold = check_threshold(threshold)
        self.reset_outlier_stats()

    def reset_outlier_stats(self) -> None:
        self.calls = 0           # forward calls
        self.columns = 0         # feature columns seen, summed over calls (in_features per call)
        self.outlier_columns = 0  # of those, columns run in full precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        cols = outlier_columns(x2, self.threshold)
        n = cols.numel()
        self.calls, self.columns, self.outlier_columns = (self.calls + 1, self.columns + self.in_features,
                                                          self.outlier_columns + n)
        if n == 0:
            return self._forward_int8(x)
        wq, sw = self._int8  # [in, out] int8, [out] fp32
        if n == self.in_features:
            return F.linear(x, self.qweight.dequantize(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)
        x_regular, x_outlier = decompose(x2, cols)
        y_outlier = x_outlier.float() @ (wq[cols].float() * sw)  # [T, n] @ [n, out]
        y = self._forward_int8(x_regular).float() + y_outlier
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


@dataclass(frozen=True)
class OutlierStats:
    share: float                    # outlier columns / columns, over every LLMInt8Linear call
    columns: int
    outlier_columns: int
    calls: int
    by_module: dict[str, float]     # module name -> its own share (0.0 before any call)


def outlier_stats(model: nn.Module, reset: bool = False) -> OutlierStats:
    """Share of feature columns that LLM.int8() ran in full precision since the last reset.

    Example: outlier_stats(model).share -> 0.0031 (0.31% of columns, summed over calls and layers)
    """
    mods = {name: m for name, m in model.named_modules() if isinstance(m, LLMInt8Linear)}
    if not mods:
        raise ValueError(f"outlier_stats: {type(model).__name__} has no LLMInt8Linear module; quantize it with "
                         "the 'llm-int8' recipe first")
    columns = sum(m.columns for m in mods.values())
    outliers = sum(m.outlier_columns for m in mods.values())
    stats = OutlierStats(share=outliers / columns if columns else 0.0, columns=columns, outlier_columns=outliers,
                         calls=sum(m.calls for m in mods.values()),
                         by_module={n: m.outlier_columns / m.columns if m.columns else 0.0 for n, m in mods.items()})
    if reset:
        for m in mods.values():
            m.reset_outlier_stats()
    return stats
