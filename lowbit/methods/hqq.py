"""HQQ-style data-free affine quantization (Badri & Shaji, 2023).

Half-quadratic splitting of  min_z ||W - Q_z^{-1}(Q_z(W))||_p  (p < 1, robust
to the heavy-tailed error of outlier weights) with an auxiliary error W_e,
starting from round to nearest with its zero point rounded to an integer:

    W_q = clamp(round(W / s + z))              codes
    W_r = (W_q - z) * s                        reconstruction
    W_e = shrink_p(W - W_r, beta)              sparse error, generalised soft threshold
    z   = mean(W_q - (W - W_e) / s)            closed-form zero point
    beta *= kappa

Every zero point is rounded to what is stored (the scale format, or an integer
when the scheme has `integer_zero`) before it is scored, so the codes and the
error the solver sees are exactly those of the stored QTensor. Each group keeps
its best zero point by mean |W - W_r| (RTN's included, so no group is worse than
round to nearest in that error); the loop stops when no group improves on its
previous step. (A least-squares refit of (s, z) to the codes, tried after the
loop, never lowered this error on SmolLM2's weights and was dropped.)

The hqq library groups along the output axis (`PerGroup(64, axis=0)`); so does
the `w4g64-hqq` recipe, which measured best on SmolLM2 (docs/benchmarks.md).
"""
from __future__ import annotations

import torch

from ..core import QTensor, Scheme, quantize
from ..core import scales as scale_store
from ..core.granularity import GroupView
from ..core.grid import encode_part
from ..core.packing import pack_bits_le


def hqq(w: torch.Tensor, scheme: Scheme, *, iters: int = 20, lp: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01, round_zero: bool = True) -> QTensor:
    """w: [out, in] -> QTensor in an affine integer `scheme` (e.g. uint4, group 64, axis 0).

    iters: proximal steps on the zero point (0 with round_zero=False: round to nearest);
    lp: the p of the l_p error; beta, kappa: the penalty and its growth per step;
    round_zero: start from the RTN zero point rounded to an integer (the hqq library's 4-bit default).
    Example: hqq(w, Scheme("uint4", PerGroup(64, axis=0), symmetric=False, range="minmax")).
    """
    if scheme.symmetric or scheme.fmt.kind != "int":
        raise ValueError(f"hqq optimises affine integer schemes (e.g. 'uint4', symmetric=False); got "
                         f"{scheme.format!r} with symmetric={scheme.symmetric}")
    if iters < 0 or not 0 < lp <= 1 or beta <= 0 or kappa < 1:
        raise ValueError(f"hqq options: need iters >= 0 (got {iters}), 0 < lp <= 1 (got {lp}), "
                         f"beta > 0 (got {beta}), kappa >= 1 (got {kappa})")
    rtn = quantize(w, scheme)
    view = GroupView(tuple(w.shape), scheme.granularity)
    fmt = scheme.fmt

    def stored_zero(z):
        z = torch.round(z).clamp_(fmt.qmin, fmt.qmax) if scheme.integer_zero else z
        return scale_store.round_to(z, scheme.scale_format, what="zero point")

    new_s, new_z, codes = [], [], []
    for W, s, z in zip(view.parts(w.float()), view.split_stats(rtn.scale_values()),
                       view.split_stats(rtn.zero_values())):
        start = stored_zero(torch.round(z)) if round_zero else z
        z = _proximal_zero(W, s, z, start, fmt, stored_zero, iters, lp, beta, kappa)
        new_s.append(s.reshape(-1))
        new_z.append(z.reshape(-1))
        codes.append(encode_part(W, s, z, fmt))
    scales = scale_store.store(view.merge_stats(new_s), scheme.scale_format)
    zeros = scale_store.store(view.merge_stats(new_z), scheme.scale_format)
    packed = pack_bits_le(view.merge(codes).contiguous(), scheme.bits)
    return QTensor(packed, tuple(w.shape), scheme, scales=scales, zeros=zeros)


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal step of the l_p (p < 1) penalty."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp(min=1e-12).pow(p - 1) / beta)


def _codes(W, s, z, fmt):
    """Integer grid values (as floats) of W under scale s and zero point z (encode_part's arithmetic)."""
    return torch.round(W / s + z).clamp_(fmt.qmin, fmt.qmax)


def _l1(W, s, z, fmt):
    """[G, 1] mean |W - W_r| per group, with the codes W_r is made of."""
    Wq = _codes(W, s, z, fmt)
    return (W - (Wq - z) * s).abs_().mean(1, keepdim=True), Wq


def _proximal_zero(W, s, z_rtn, z, fmt, stored_zero, iters, lp, beta, kappa):
    """W: [G, L], s, z_rtn (RTN's) and z (the start): [G, 1] -> the stored zero point [G, 1]
    with the lowest mean |W - W_r| among RTN's, the start and `iters` steps from it."""
    best_err, best_z = _l1(W, s, z_rtn, fmt)[0], z_rtn
    err, Wq = _l1(W, s, z, fmt)
    better = err < best_err
    best_z, best_err = torch.where(better, z, best_z), torch.where(better, err, best_err)
    for _ in range(iters):
        We = shrink_lp(W - (Wq - z) * s, beta, lp)
        z = stored_zero((Wq - (W - We) / s).mean(1, keepdim=True))
        beta *= kappa
        new_err, Wq = _l1(W, s, z, fmt)
        better = new_err < best_err
        best_z, best_err = torch.where(better, z, best_z), torch.where(better, new_err, best_err)
        if not bool((new_err < err).any()):
            break  # no group moved downhill: the loop has settled
        err = new_err
    return best_z
