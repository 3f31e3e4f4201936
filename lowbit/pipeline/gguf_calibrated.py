"""Calibrated codes in llama.cpp's blocks: AWQ scales folded into the weights, then GPTQ on each
tensor's own GGML type, block by block through the sequential runner; or learned rounding (signround:
each block's layers trained together on the codes of their types' grids, the types' own scales kept).

    solve_ggml(model, {"model.layers.0.mlp.up_proj": "q4_k", ...}, calibration)

io/gguf/calibrated.py gives each Linear the type llama.cpp's quantizer picks for a file type
(quantize_gguf(model, "q4_k_m", calibration)), so the file has the same tensor types and size
as `llama-quantize` of the same type. The model keeps
float nn.Linear layers whose weights are exactly the dequantized blocks (what the next block's
calibration and lowbit's own evaluation see); the blocks themselves wait in
`model.lowbit_gguf_blocks` ({parameter name: (GGML type, uint8 blocks [out, bytes])}) for the
writer, which checks they still decode to the layer's weights. Embeddings, norms and the output
layer are written by the writer as usual (round to nearest).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..core.ggml_blocks import dequantize_rows, get_type, quantize_rows
from ..core.hessian import output_error
from ..core.phases import phase
from ..methods import block_transforms, model_transforms, parse_method
from ..methods.gptq_ggml import gptq_ggml
from ..methods.signround import GGMLRounding
from .learned_rounding import BlockRounding
from .quantize import _batches
from .rotate import rotate_model
from .sequential import LayerReport, run_sequential
from .sequential import calibration_dtype as _calibration_dtype
from .transforms import apply_transforms
from .walk import linear_weight

METHODS = ("awq+gptq", "gptq", "awq", "signround", "awq+signround", "rotate+awq+gptq", "rotate+gptq", "rotate+awq")
# AWQ's exponent search here: 9 of the 20 grid points (coarse, then refined around the best; methods/awq.py).
# On SmolLM2 q4_0 (32 windows) it made the very file the full search makes (llama-perplexity 24.8164 both) at
# 9 of 20 round trips. Scoring every 4th row as well (row_stride=4) cost 1.1% of perplexity there (25.0800).
AWQ_SEARCH = {"coarse": 4, "row_stride": 1}


@dataclass(frozen=True)
class GGMLScheme:
    """A GGML block type where the transforms expect a Scheme: AWQ's scale search rounds with it."""
    type: str

    def roundtrip(self, w: torch.Tensor) -> torch.Tensor:
        rows = w.detach().float().numpy()
        with phase("ggml fits"):
            return torch.from_numpy(dequantize_rows(quantize_rows(rows, self.type), self.type, w.shape[1]))


def solve_ggml(model: nn.Module, types: dict[str, str], calibration: Iterable, *, method: str = "awq+gptq",
               damp: float = 0.01, act_order: bool = True, progress: bool = True, batch_size: int = 8,
               calibration_dtype: "torch.dtype | str" = "auto", signround: dict | None = None) -> nn.Module:
    """Solve the Linear layers `types` names ({module name: GGML type}) of `model`'s blocks on their
    types, in place; the blocks land in model.lowbit_gguf_blocks. "rotate+..." rotates the whole model
    first (pipeline/rotate.py; the types do not change: they follow the Linear layers' shapes).

    signround: the learned-rounding options (steps, lr, batch_windows, seed) for method signround."""
    if method not in METHODS:
        raise ValueError(f"calibrated GGUF method {method!r}: choose {', '.join(METHODS)} (or rtn: save directly)")
    transforms, solver = parse_method(method)
    if model_transforms(method):
        model.lowbit_rotation = rotate_model(model)
    transforms = block_transforms(transforms)
    blocks: dict[str, tuple[str, np.ndarray]] = {}
    dtype = _calibration_dtype(calibration_dtype)
    learned = BlockRounding(lambda name, w: GGMLRounding(w, types[name]), signround or {}, dtype) \
        if solver == "signround" else None

    def quantize_layer(name: str, stats) -> LayerReport:
        t = types[name]
        w = linear_weight(model.get_submodule(name))
        wf, H = w.detach().float(), stats.hessian
        with phase("ggml fits"):  # round to nearest's fit, also GPTQ's static grid (one fit of the weights)
            fit = get_type(t).fit(np.ascontiguousarray(wf.numpy()).reshape(-1, get_type(t).block_size))
            rtn = fit.pack(fit.codes).reshape(wf.shape[0], -1)
            rtn_w = torch.from_numpy(dequantize_rows(rtn, t, wf.shape[1]))
        with phase("layer losses"):  # ||(W - Q) X||^2 / ||W X||^2, the denominator once for both
            scale = 1 / max(_output_energy(wf, H), 1e-30)
            rtn_loss = _output_energy(wf - rtn_w, H) * scale
        data, loss, w_hat = rtn, rtn_loss, rtn_w
        if learned is not None:  # trained on the block's output: no layer-loss guard, the block loss decides
            data = learned.learned.pop(name).blocks()
            with phase("ggml fits"):
                w_hat = torch.from_numpy(dequantize_rows(data, t, wf.shape[1]))
            with phase("layer losses"):
                loss = _output_energy(wf - w_hat, H) * scale
        if solver == "gptq":  # its never-worse-than-RTN guard is applied here, with the RTN bytes made once
            with phase("gptq solves"):  # its loss from its own errors (no [out, in] x [in, in] product)
                solved, solved_w, solved_loss = gptq_ggml(wf, t, stats=stats, damp=damp, act_order=act_order,
                                                          fallback_to_rtn=False, fit=fit, with_loss=True)
            solved_loss *= scale
            if solved_loss <= rtn_loss:
                data, loss, w_hat = solved, solved_loss, solved_w
        with torch.no_grad():
            w.copy_(w_hat.to(w.dtype))
        blocks[f"{name}.weight"] = (t, data)
        return LayerReport(name, f"{method} ({t})", loss, rtn_loss)

    aim = "signround" if solver == "signround" else "gptq"  # the weights stay unclipped for either

    def transform(block, local, stats, producers, sample, where):
        head = where + "."
        apply_transforms(block, local, {n: transforms for n in local}, {n: GGMLScheme(types[head + n]) for n in local},
                         stats, producers, sample, where, solvers={n: aim for n in local},
                         options={"awq": AWQ_SEARCH})

    report = run_sequential(model, list(types), _batches(calibration, batch_size), quantize_layer, hessian=True,
                            magnitudes="awq" in transforms, transform=transform if transforms else None,
                            compute_dtype=calibration_dtype, progress=progress, solve_block=learned)
    if learned is not None:
        report.block_losses = learned.losses
    model.lowbit_calibration = report
    model.lowbit_gguf_blocks = blocks
    return model


def _output_energy(d: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H D^T) for D [out, in]: ||D X||^2 * 2 / n over the calibration tokens (H = 2 X X^T / n)."""
    return float(output_error(d, H))
