"""GPTQ (Frantar et al., 2023): quantize a weight column by column and push each
column's rounding error onto the columns not yet quantized, weighted by the
inverse Hessian of the layer-wise loss ||W X - Q X||^2 (H = 2 X X^T / n).

    H += damp * mean(diag H) * I;  U = chol(H^-1, upper)
    for each column j (in activation order when act_order):
        q_j = Q(w_j);  e = (w_j - q_j) / U_jj;  w_{j+1:} -= e U_{j, j+1:}

with the updates of the columns beyond the current block of `block_size`
columns applied once per block (lazy batch updates). Any format of the
foundation is the grid: integers, fp4/fp8, NF4, NVFP4 (the codes come from
core.grid.encode_part, exactly what round-to-nearest uses).

Scales and zero points: group-wise schemes fit each group's parameters when the
solve reaches it, from the already-updated weights (the paper's variant). With
act_order, double-quantized scales or a tensor scale (NVFP4) they are fitted
once up front from the original weights ("static groups"), so the stored
layout stays the usual contiguous groups of input columns and needs no
per-column group index. The result is never worse than round-to-nearest on
the layer loss tr(D H D^T): where the greedy solve loses, RTN is returned.
"""
from __future__ import annotations

import threading
import warnings

import torch

from .. import kernels
from ..core import QTensor, Scheme, fit_params, quantize
from ..core.granularity import PerChannel, PerGroup, PerTensor
from ..core.grid import decode_part, encode_part
from ..core.hessian import output_error
from ..core.packing import pack_bits_le
from ..formats import IntFormat
from .awq import awq_clip


def gptq(w: torch.Tensor, scheme: Scheme, *, stats, damp: float = 0.01, block_size: int = 128,
         act_order: bool = True, static_groups: bool = False, clip: bool = False,
         fallback_to_rtn: bool = True, kernel: bool = True) -> QTensor:
    """w: [out, in]; stats.hessian: [in, in] (see pipeline.stats.InputStats).

    clip: fit the (static) group ranges on the weights clipped by AWQ's output-error search
    (methods/awq.awq_clip), while the solve still targets the unclipped weights.
    kernel: run the column loop of static integer grids in numba (kernels.gptq_int_block)
    where available; False forces the torch loop, the reference."""
    H = getattr(stats, "hessian", None)
    if H is None:
        raise ValueError("gptq needs calibration statistics with a Hessian (run it through lowbit.quantize "
                         "with calibration batches)")
    if not damp >= 0:
        raise ValueError(f"gptq damp={damp!r}: give a number >= 0 (the share of mean(diag H) added to the "
                         "diagonal; 0.01 in the paper)")
    R, C = w.shape
    if H.shape != (C, C):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not match a weight with {C} input columns")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("the Hessian has NaN or Inf entries: the calibration activations overflowed or were "
                         "not finite; check the calibration data (or calibrate in float32)")
    gs = _group_size(scheme, C)
    W = w.detach().float().clone()
    dead = H.diagonal() == 0  # inputs that were always zero: their weights cannot matter
    W[:, dead] = 0
    static = act_order or static_groups or scheme.double_quant is not None or scheme.tensor_scale \
        or not isinstance(scheme.granularity, PerGroup)
    params = _Params(awq_clip(W, scheme, stats) if clip and static else W, scheme, gs, static)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(C)
    U = _shared_factor(stats, (damp, act_order), lambda: _inverse_hessian_factor(H[perm][:, perm], dead[perm], damp))
    W = W[:, perm]
    codes = torch.empty(R, C, dtype=torch.uint8 if scheme.bits <= 8 else torch.int32)
    fmt = scheme.fmt
    fast = kernel and static and isinstance(fmt, IntFormat) and fmt.step == 1.0 and fmt.bits <= 8
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        done = _kernel_block(W1, U1, params, perm[i1:i2], fmt) if fast else None
        if done is not None:
            codes[:, perm[i1:i2]], E1 = done
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
            continue
        E1 = torch.empty(R, i2 - i1)
        for i in range(i2 - i1):
            j = int(perm[i1 + i])
            if not static and j % gs == 0:  # no act_order: perm is the identity, columns run in order
                params.fit_group(j, torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs])
            s, z = params.column(j)
            x = W1[:, i:i + 1]
            c = encode_part(x, s, z, fmt)
            e = (x - decode_part(c, s, z, fmt)) / U1[i, i]
            codes[:, j] = c[:, 0]
            W1[:, i:].addr_(e[:, 0], U1[i, i:], alpha=-1)  # in place: no [R, n] temporary per column
            E1[:, i] = e[:, 0]
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    q = params.qtensor(pack_bits_le(codes, scheme.bits))
    # Greedy column updates are not optimal: at 2 bits or with a few rows round-to-nearest
    # can come out ahead on the layer loss; then it is the answer.
    if not fallback_to_rtn:
        return q
    rtn = quantize(w, scheme)
    loss_q, loss_r = _loss(w, q, H), _loss(w, rtn, H)
    best = q if loss_q <= loss_r else rtn
    _keep_losses(stats, w, best, loss_q if best is q else loss_r, loss_r)
    return best


def _kernel_block(W1, U1, params: "_Params", cols: torch.Tensor, fmt: IntFormat):
    """The numba column loop for one block (static params): (codes [R, B], errors [R, B]) or None."""
    if not bool(torch.isfinite(W1).all()):
        return None  # the torch loop reports NaN/Inf as the quantizers do
    S, Z = params.columns(cols)
    out = kernels.gptq_int_block(W1, U1, S, Z, fmt.qmin, fmt.qmax)
    if out is None:
        return None
    q, E1 = out
    return fmt.encode_integers(q), E1


def _loss(w: torch.Tensor, q: QTensor, H: torch.Tensor) -> torch.Tensor:
    """tr(D H D^T), D = W - Q: a 0-d float32 tensor, the numerator of pipeline's layer_loss."""
    return output_error(w.float() - q.dequantize(), H)


def _keep_losses(stats, w: torch.Tensor, q: QTensor, loss: torch.Tensor, rtn_loss: torch.Tensor) -> None:
    cache = getattr(stats, "cache", None)
    if cache is not None:
        cache[("gptq-loss", id(w))] = (w, q, loss, rtn_loss)


def solved_losses(stats, w: torch.Tensor, q: QTensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(tr(D H D^T) of q, of round-to-nearest) as gptq measured them for its fallback when it
    returned q for the weight w (the same tensor object), else None; taken once (a [rows, cols]
    x [cols, cols] product each that the calibration report need not repeat)."""
    cache = getattr(stats, "cache", None)
    kept = None if cache is None else cache.pop(("gptq-loss", id(w)), None)
    if kept is None or kept[0] is not w or kept[1] is not q:
        return None
    return kept[2], kept[3]


gptq.needs = ("hessian",)


def _group_size(scheme: Scheme, C: int) -> int:
    g = scheme.granularity
    if isinstance(g, PerGroup) and g.axis in (-1, 1):
        return g.size
    if isinstance(g, PerChannel) and g.axis in (0, -2) or isinstance(g, PerTensor):
        return C
    raise ValueError(f"gptq quantizes weights [out, in] per tensor, per output channel or in groups along "
                     f"the input axis; granularity {g} is not supported")


_FACTOR_LOCK = threading.Lock()


def _shared_factor(stats, key, compute):
    """Layers reading one input (q/k/v, gate/up) share its InputStats: factor H once for all.

    The runner solves two layers at once (threads): the lock makes the second wait for the first's
    factor instead of computing the same one beside it."""
    cache = getattr(stats, "cache", None)
    if cache is None:
        return compute()
    with _FACTOR_LOCK:
        if ("gptq", key) not in cache:
            cache[("gptq", key)] = compute()
        return cache[("gptq", key)]


def _inverse_hessian_factor(H: torch.Tensor, dead: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1 (U^T U = that inverse); see damped_factor."""
    return damped_factor(H, dead, damp)[0]


def damped_factor(H: torch.Tensor, dead: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """(U, lam): the upper Cholesky factor U of (H + lam I)^-1 (U^T U = that inverse), in float64, and the
    dampening lam it took: damp * mean(diag H), or more where H needed it; a dead input's diagonal counts 1
    (its H entry is 1 + lam).

    Without forming the inverse: with J the reversal of the columns, J H J = L L^T (lower L) gives
    H^-1 = J L^-T L^-1 J = U^T U for U = J L^-1 J, which is upper triangular. One Cholesky (n^3/3)
    and one triangular inverse (2n^3/3 in matrix products) against Cholesky, LAPACK's inverse (potri,
    slow in MKL: 37 s against 2.5 s for the Cholesky in a probe at n = 4096) and a second Cholesky
    before."""
    Hr = H.flip((0, 1)).double()
    diag = Hr.diagonal()
    diag[dead.flip(0)] = 1.0
    base = diag.clone()
    mean = float(base.mean())  # > 0: dead inputs count 1
    lam = damp * mean
    for _ in range(6):  # a Hessian that is not positive definite gets more dampening
        torch.add(base, lam, out=diag)
        L, info = torch.linalg.cholesky_ex(Hr)
        if info == 0:
            del Hr, diag  # 8 n^2 bytes each (1.6 GB at n = 14336): free before the inverse
            Li = lower_inverse(L)
            del L
            return Li.float().flip((0, 1)), lam
        tried, lam = lam, max(10 * lam, 1e-4 * mean)  # damp=0 escalates too (0 * 10 would stay 0)
        # each retry is another n^3/3 Cholesky, and the solve then works on a more dampened H: say so
        warnings.warn(f"gptq: the {len(diag)}-column Hessian is not positive definite at {tried / mean:.3g} x "
                      f"mean(diag H) of dampening; retrying at {lam / mean:.3g} (more calibration tokens than "
                      "columns, or calibration_dtype='fp32', avoid it)", RuntimeWarning, stacklevel=2)
    raise ValueError("the Hessian is not positive definite even with strong dampening; "
                     "check the calibration data (NaN or too few tokens?)")


def lower_inverse(L: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """L^-1 of a lower triangular L: [n, n], by halves in matrix products (2n^3/3 flops):

        [A 0]^-1   [ A^-1            0   ]
        [B C]    = [ -C^-1 B A^-1   C^-1 ]

    (a triangular solve against the identity costs n^3 at a lower rate)."""
    out = torch.zeros_like(L)
    _lower_inverse_into(L, out, leaf)
    return out


def _lower_inverse_into(L: torch.Tensor, out: torch.Tensor, leaf: int) -> None:
    n = L.shape[0]
    if n <= leaf:
        out.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype), upper=False))
        return
    k = n // 2
    _lower_inverse_into(L[:k, :k], out[:k, :k], leaf)
    _lower_inverse_into(L[k:, k:], out[k:, k:], leaf)
    torch.mm(out[k:, k:], L[k:, :k] @ out[:k, :k], out=out[k:, :k])
    out[k:, :k].neg_()


class _Params:
    """Per-column scales and zero points, fitted up front (static) or group by group."""

    def __init__(self, W: torch.Tensor, scheme: Scheme, gs: int, static: bool):
        self.scheme, self.gs, self.shape = scheme, gs, tuple(W.shape)
        self.static = fit_params(W, scheme) if static else None
        if static:
            s = self.static.scale_values()
            z = self.static.zero_values()
            R = W.shape[0]
            self._s = s.reshape(R, -1) if s.dim() else s.reshape(1, 1).expand(R, 1)
            self._z = None if z is None else (z.reshape(R, -1) if z.dim() else z.reshape(1, 1).expand(R, 1))
        else:
            self._groups: list[tuple[QTensor, torch.Tensor, torch.Tensor | None]] = []

    def fit_group(self, j: int, cols: torch.Tensor) -> None:
        g = fit_params(cols, self.scheme)
        z = g.zero_values()
        self._groups.append((g, g.scale_values().reshape(-1, 1), None if z is None else z.reshape(-1, 1)))

    def column(self, j: int):
        k = j // self.gs
        if self.static is not None:
            k = min(k, self._s.shape[1] - 1)
            return self._s[:, k:k + 1], None if self._z is None else self._z[:, k:k + 1]
        return self._groups[k][1:]

    def columns(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static params of input columns `cols`: scales and zero points [R, len(cols)] (zeros: 0)."""
        k = (cols // self.gs).clamp(max=self._s.shape[1] - 1)
        S = self._s[:, k].float()
        return S, torch.zeros_like(S) if self._z is None else self._z[:, k].float()

    def qtensor(self, packed: torch.Tensor) -> QTensor:
        if self.static is not None:
            q = self.static
            q.codes = packed
            return q
        groups = [g for g, _, _ in self._groups]
        scales = torch.cat([g.scales.reshape(-1, 1) for g in groups], dim=1)
        zeros = None if groups[0].zeros is None else torch.cat([g.zeros.reshape(-1, 1) for g in groups], dim=1)
        return QTensor(packed, self.shape, self.scheme, scales=scales, zeros=zeros)
