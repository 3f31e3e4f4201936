"""HQQ-style data-free affine quantization (Badri & Shaji, 2023), plus a
least-squares polish.

Half-quadratic splitting of  min_z ||W - Q_z^{-1}(Q_z(W))||_p  (p < 1, robust
to the heavy-tailed error of outlier weights) with an auxiliary error W_e:

    W_q = clamp(round(W / s + z))              codes
    W_r = (W_q - z) * s                        reconstruction
    W_e = shrink_p(W - W_r, beta)              sparse error, generalised soft threshold
    z   = mean(W_q - (W - W_e) / s)            closed-form zero point
    beta *= kappa

keeping the best zero point by mean |W - W_r|. Then `ls_steps` rounds of
alternating least squares refit (s, z) to the codes per group (a linear
regression W ~ s q - s z), which lowers the squared error further; a group
whose squared error would rise over round-to-nearest keeps the RTN parameters,
so the result is never worse than RTN in MSE on any group.
"""
from __future__ import annotations

import torch

from ..core import QTensor, Scheme, quantize
from ..core import scales as scale_store
from ..core.granularity import GroupView
from ..core.grid import encode_part
from ..core.packing import pack_bits_le


def hqq(w: torch.Tensor, scheme: Scheme, *, iters: int = 20, lp: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01, ls_steps: int = 4) -> QTensor:
    """w: [out, in] -> QTensor in an affine integer `scheme` (e.g. uint4, group 64)."""
    if scheme.symmetric or scheme.fmt.kind != "int":
        raise ValueError(f"hqq optimises affine integer schemes (e.g. 'uint4', symmetric=False); got "
                         f"{scheme.format!r} with symmetric={scheme.symmetric}")
    rtn = quantize(w, scheme)
    view = GroupView(tuple(w.shape), scheme.granularity)
    fmt = scheme.fmt
    s_cols = view.split_stats(rtn.scale_values())
    z_cols = view.split_stats(rtn.zero_values())
    new_s, new_z, codes = [], [], []
    for W, s, z in zip(view.parts(w.float()), s_cols, z_cols):
        s1, z1 = _proximal_zero(W, s, z, fmt, iters, lp, beta, kappa)
        s1, z1 = _least_squares(W, s1, z1, fmt, ls_steps, scheme.scale_format)
        s1, z1 = _keep_if_better(W, (s, z), (s1, z1), fmt)
        new_s.append(s1.reshape(-1))
        new_z.append(z1.reshape(-1))
        codes.append(encode_part(W, s1, z1, fmt))
    scales = scale_store.store(view.merge_stats(new_s), scheme.scale_format)
    zeros = scale_store.store(view.merge_stats(new_z), scheme.scale_format)
    packed = pack_bits_le(view.merge(codes).contiguous(), scheme.bits)
    return QTensor(packed, tuple(w.shape), scheme, scales=scales, zeros=zeros)


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal step of the l_p (p < 1) penalty."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp(min=1e-12).pow(p - 1) / beta)


def _codes(W, s, z, fmt):
    """Integer grid values (as floats) of W under scale s and zero point z."""
    return torch.round(W / s + z).clamp_(fmt.qmin, fmt.qmax)


def _proximal_zero(W, s, z, fmt, iters, lp, beta, kappa):
    best_z = z
    best_err = (W - (_codes(W, s, z, fmt) - z) * s).abs_().mean(1, keepdim=True)
    for _ in range(iters):
        Wq = _codes(W, s, z, fmt)
        We = shrink_lp(W - (Wq - z) * s, beta, lp)
        z = (Wq - (W - We) / s).mean(1, keepdim=True)
        beta *= kappa
        err = (W - (_codes(W, s, z, fmt) - z) * s).abs_().mean(1, keepdim=True)
        better = err < best_err
        best_z, best_err = torch.where(better, z, best_z), torch.where(better, err, best_err)
    return s, best_z


def _least_squares(W, s, z, fmt, steps, scale_format):
    """Refit W ~ a * q + b per group given the codes, then re-round; repeat."""
    wm = W.mean(1, keepdim=True)
    for _ in range(steps):
        q = _codes(W, s, z, fmt)
        qc = q - q.mean(1, keepdim=True)
        var = qc.pow(2).mean(1, keepdim=True)
        a = (qc * (W - wm)).mean(1, keepdim=True) / var.clamp(min=1e-12)
        ok = (var > 0) & (a > 0)
        a = torch.where(ok, a, s)
        b = torch.where(ok, wm - a * q.mean(1, keepdim=True), -z * s)
        s_new = scale_store.round_to(a, scale_format)
        z = scale_store.round_to(-b / s_new, scale_format, what="zero point")
        s = s_new
    return s, z


def _keep_if_better(W, old, new, fmt):
    def sq_err(s, z):
        return (W - (_codes(W, s, z, fmt) - z) * s).pow_(2).sum(1, keepdim=True)

    better = sq_err(*new) < sq_err(*old)
    return torch.where(better, new[0], old[0]), torch.where(better, new[1], old[1])
