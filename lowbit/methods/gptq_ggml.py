"""GPTQ on a GGML block type's own grid: calibrated codes that stock llama.cpp reads.

llama.cpp quantizes each block of a row independently (with an importance matrix: a weighted
search for the block's scales). Here the same blocks get GPTQ's error feedback instead
(methods/gptq.py for the algorithm): the columns run left to right; when the solve reaches a
type's block (32 values, or a K-quant super-block of 256 with its 8 or 16 sub-block scales), the
type's own reference search fits the block's parameters on the already-updated weights
(GGMLType.fit), then every column of the block is rounded to the nearest level of that grid and
its error pushed onto the columns not yet quantized. The bytes are the type's standard layout
(BlockFit.pack), so any GGUF reader decodes them; only the choice of scales and codes differs.

With act_order the columns run by decreasing Hessian diagonal and the parameters are fitted up
front on the original weights (static: a block's scales cannot follow columns that run out of
order). Never worse than round to nearest on the layer loss tr(D H D^T): where the greedy solve
loses, the reference bytes are returned.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import kernels
from ..core.ggml_blocks import dequantize_rows, get_type
from ..core.hessian import output_error
from ..core.phases import phase
from .gptq import _shared_factor, damped_factor


def gptq_ggml(w: torch.Tensor, type_name: str, *, stats, damp: float = 0.01, block_size: int = 128,
              act_order: bool = True, clip: bool = False, fallback_to_rtn: bool = True, kernel: bool = True,
              fit=None, with_loss: bool = False):
    """w: [out, in] -> GGML blocks [out, in // block * type_size] uint8 of type `type_name`.

    fit: the type's fit of w's blocks (t.fit(w.reshape(-1, block))) where the caller made it already (its
    round to nearest): with act_order it is the static grid, unless a dead input or clip changes the weights
    fitted (then fitted here again).
    with_loss: -> (blocks, their values [out, in] float32, tr(D H D^T) for D = w - values), the loss from the
    solve's own errors instead of a [out, in] x [in, in] product: GPTQ's updates make D = E U (E the scaled
    errors, U^T U = (H + lam I)^-1), so tr(D (H + lam I) D^T) = ||E||^2 and tr(D H D^T) = ||E||^2 - lam ||D||^2
    (float64 sums; within 1e-5 of the product on a SmolLM2 layer).

    clip (with act_order's up-front fit): fit each block's parameters on its weights clipped to the
    ratio of CLIP_RATIOS whose round-to-nearest output error (the block's diagonal block of H) is
    least, as AWQ clips groups; the solve still targets the unclipped weights. Off by default: on a
    4-layer SmolLM2 q4_0 it moved the KL to the float model by 0.6% (0.02101 -> 0.02088), within noise,
    for 9 extra round trips per weight.
    kernel: with act_order, run each block's column loop in numba (kernels.gptq_grid_block), the same
    float32 operations as the torch loop here; False forces the torch loop, the reference."""
    t = get_type(type_name)
    if with_loss and fallback_to_rtn:
        raise ValueError("gptq_ggml: with_loss measures the solve itself, not a fallback; give fallback_to_rtn=False")
    if t.fit is None:
        raise ValueError(f"GGML type {type_name!r} has no grid to solve on (a float type): write it as it is")
    H = getattr(stats, "hessian", None)
    if H is None:
        raise ValueError("gptq on GGML blocks needs calibration statistics with a Hessian")
    R, C = w.shape
    if C % t.block_size:
        raise ValueError(f"GGML type {type_name!r} needs rows that are a multiple of {t.block_size} values, got {C}")
    if H.shape != (C, C) or not bool(torch.isfinite(H).all()):
        raise ValueError(f"the Hessian ({tuple(H.shape)}) does not match a weight with {C} input columns or is "
                         "not finite; check the calibration data")
    if block_size % t.block_size and t.block_size % block_size:
        raise ValueError(f"block_size {block_size} and the type's {t.block_size}-value blocks must nest")
    W = w.detach().float().clone()
    dead = H.diagonal() == 0
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(C)
    U, lam = _shared_factor(stats, (damp, act_order, "lam"),
                            lambda: damped_factor(H[perm][:, perm], dead[perm], damp))
    prefit = fit if act_order and not clip and not bool(dead.any()) else None
    grid = _Grid(t, _clipped(W, t, H) if act_order and clip else W, static=act_order, fit=prefit)
    Wz = W.clone() if with_loss else None  # what the solve aims at (dead inputs zeroed), for its loss
    W = W[:, perm]
    fast = kernel and act_order and bool(torch.isfinite(W).all())
    err2 = torch.zeros((), dtype=torch.float64)  # ||E||^2
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        if fast:
            E1 = grid.solve_block(W1, U1, perm[i1:i2])
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
            if with_loss:
                err2 += E1.double().square().sum()
            continue
        E1 = torch.empty(R, i2 - i1)
        for i in range(i2 - i1):
            j = int(perm[i1 + i])
            if not act_order and j % t.block_size == 0:
                grid.fit_block(j, torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :t.block_size])
            x = W1[:, i]
            q = grid.round(j, x)
            e = (x - q) / U1[i, i]
            W1[:, i:].addr_(e, U1[i, i:], alpha=-1)
            E1[:, i] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
        if with_loss:
            err2 += E1.double().square().sum()
    blocks = grid.pack()
    if with_loss:
        with phase("ggml fits"):
            values = torch.from_numpy(dequantize_rows(blocks, type_name, C))
        added = torch.full((C,), lam, dtype=torch.float64)
        added[dead] += 1.0  # a dead input's diagonal was 1 + lam
        loss = float(err2 - ((Wz - values).square().sum(0, dtype=torch.float64) * added).sum())
        return blocks, values, loss
    if not fallback_to_rtn:
        return blocks
    rtn = t.quantize(np.ascontiguousarray(w.detach().float().numpy()).reshape(-1, t.block_size)).reshape(R, -1)
    return blocks if _loss(w, blocks, type_name, H) <= _loss(w, rtn, type_name, H) else rtn


CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(9))  # 1.0 down to 0.6


def _clipped(W: torch.Tensor, t, H: torch.Tensor) -> torch.Tensor:
    """W with each (row, block) clipped to the ratio of its absolute maximum whose round trip through
    the type has the least output error d H_bb d^T. Every GGML fit works block by block, so fitting
    the mixed result gives each block the parameters of its best ratio."""
    R, C = W.shape
    bs = t.block_size
    nb = C // bs
    Hb = torch.stack([H[b * bs:(b + 1) * bs, b * bs:(b + 1) * bs] for b in range(nb)])  # [nb, bs, bs]
    amax = W.reshape(R, nb, bs).abs().amax(-1, keepdim=True)
    best, out = None, W.clone()
    for r in CLIP_RATIOS:
        lim = (amax * r).expand(R, nb, bs).reshape(R, C)
        Wc = torch.maximum(torch.minimum(W, lim), -lim)
        blocks = t.quantize(np.ascontiguousarray(Wc.numpy()).reshape(-1, bs))
        d = (W - torch.from_numpy(t.dequantize(blocks)).reshape(R, C)).reshape(R, nb, bs)
        err = torch.einsum("rbi,bij,rbj->rb", d, Hb, d)
        if best is None:
            best = err
            continue
        better = err < best
        best = torch.where(better, err, best)
        out = torch.where(better.repeat_interleave(bs, dim=1), Wc, out)
    return out


def _loss(w: torch.Tensor, blocks: np.ndarray, type_name: str, H: torch.Tensor) -> float:
    return float(output_error(w.float() - torch.from_numpy(dequantize_rows(blocks, type_name, w.shape[1])), H))


class _Grid:
    """The block parameters of one weight and the codes chosen so far; fitted block by block
    (dynamic) or all at once from the original weights (static)."""

    def __init__(self, t, W: torch.Tensor, static: bool, fit=None):
        self.t, self.R, self.C = t, W.shape[0], W.shape[1]
        self.nb = self.C // t.block_size
        self.codes = np.zeros((self.R, self.C), np.uint8)
        self.fits: list = [None] * self.nb
        self.S = torch.zeros(self.R, self.C)  # per column: the scale and offset of its sub-block
        self.O = torch.zeros(self.R, self.C)
        self.levels = None
        if static:
            f = fit
            if f is None:
                with phase("ggml fits"):
                    f = t.fit(np.ascontiguousarray(W.numpy()).reshape(-1, t.block_size))
            self.fits = f
            self._place(0, self.C, f)

    def fit_block(self, j: int, cols: torch.Tensor) -> None:
        with phase("ggml fits"):
            f = self.t.fit(np.ascontiguousarray(cols.numpy(), dtype=np.float32))
        self.fits[j // self.t.block_size] = f
        self._place(j, j + self.t.block_size, f)

    def _place(self, c0: int, c1: int, f) -> None:
        """Spread a fit's per-sub-block scale/offset over its columns c0..c1 of every row."""
        rep = f.sub
        S = torch.from_numpy(f.scale).reshape(self.R, -1).repeat_interleave(rep, dim=1)
        O = torch.from_numpy(f.offset).reshape(self.R, -1).repeat_interleave(rep, dim=1)
        self.S[:, c0:c1], self.O[:, c0:c1] = S, O
        self.codes[:, c0:c1] = f.codes.reshape(self.R, c1 - c0)  # round to nearest's: kept where scale is 0
        if self.levels is None:
            self.levels = torch.from_numpy(f.levels)
            step = np.diff(f.levels)
            self.uniform = bool(len(step) and (step == 1).all())
            self.mid = (self.levels[1:] + self.levels[:-1]) / 2

    def round(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Column j's values x [R] -> the nearest grid values (its codes are kept for pack)."""
        s, o = self.S[:, j], self.O[:, j]
        live = s != 0
        u = (x - o) / torch.where(live, s, torch.ones_like(s))
        if self.uniform:
            idx = (torch.round(u) - self.levels[0]).clamp(0, len(self.levels) - 1).to(torch.int64)
        else:
            idx = torch.searchsorted(self.mid, u.contiguous())
        old = torch.from_numpy(self.codes[:, j]).to(torch.int64)
        idx = torch.where(live, idx, old)
        self.codes[:, j] = idx.numpy().astype(np.uint8)
        return s * self.levels[idx] + o

    def solve_block(self, W1: torch.Tensor, U1: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """GPTQ's column loop over columns `cols` (W1: their weights [R, B], updated) on the static grid, in
        numba; their codes are kept -> the scaled errors E [R, B]."""
        idx = cols.numpy()
        codes = np.ascontiguousarray(self.codes[:, idx])
        E = kernels.gptq_grid_block(W1, U1, self.S[:, cols], self.O[:, cols], self.levels.numpy(), self.uniform,
                                    codes)
        self.codes[:, idx] = codes
        return E

    def pack(self) -> np.ndarray:
        bs = self.t.block_size
        if not isinstance(self.fits, list):  # static: one fit over all blocks, rows then blocks
            return self.fits.pack(self.codes.reshape(-1, bs)).reshape(self.R, -1)
        return np.concatenate([f.pack(self.codes[:, b * bs:(b + 1) * bs]) for b, f in enumerate(self.fits)], axis=1)


gptq_ggml.needs = ("hessian",)
