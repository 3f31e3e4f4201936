"""QuantModule: what every module holding a QTensor shares: how it follows .to / .half / .float.

The QTensor is not a buffer (its layout is the file format), so `Module._apply` would not reach
it. A dtype cast sets the module's compute dtype (`self.dtype`, what `.weight` and the outputs
are) and casts its float parameters (bias), while the QTensor stays exactly as stored; a move
to any device other than the CPU is refused rather than leaving the codes behind.
"""
from __future__ import annotations

import torch
from torch import nn


class QuantModule(nn.Module):
    dtype: torch.dtype

    def _apply(self, fn, recurse=True):
        # Module.to/.half/.cuda reach tensors through _apply: see what `fn` does on two probes.
        f32, f16 = fn(torch.zeros(1)), fn(torch.zeros(1, dtype=torch.float16))
        if f32.device.type != "cpu":
            raise ValueError(f"{type(self).__name__} runs on the CPU only; cannot move it to {f32.device}: "
                             "keep the quantized model on the CPU")
        out = super()._apply(fn, recurse)
        if f32.dtype == f16.dtype and f32.dtype.is_floating_point:  # a cast (.half(), .to(dtype)), not a move
            self.dtype = f32.dtype
        return out
