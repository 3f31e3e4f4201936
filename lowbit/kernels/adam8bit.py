"""One fused pass of block-wise 8-bit Adam with numba: decode both moments, update them and
the parameter, find each block's new absmax and round the moments back to their maps,
blocks in parallel. lowbit/optim/adam.py's torch path is the reference
(tests/test_optim.py pins this kernel to it).

Rounding to the nearest of 256 sorted map values is the step that costs: a binary search
is 8 unpredictable branches per value. Instead the top 16 bits of x's float32 pattern index
a 65,536-entry table of the code at the interval's low end (start_codes), and one
branch-free compare with the next midpoint finishes: within [-1, 1] the maps' values lie
further apart than a bf16 ulp, so no such interval holds two midpoints. Ties go up, as
torch.bucketize(right=True).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import njit, prange

F32 = np.float32


@functools.lru_cache(maxsize=8)
def _start_codes(mids_bytes: bytes) -> np.ndarray:
    mids = np.frombuffer(mids_bytes, dtype=np.float32)
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    negative = (hi >> 31) == 1
    low = np.where(negative, hi | 0xFFFF, hi).view(np.float32)  # the interval's most negative value
    low = np.nan_to_num(low, nan=0.0, posinf=np.inf, neginf=-np.inf)
    return np.searchsorted(mids, low, side="right").astype(np.uint8)


def start_codes(mids: torch.Tensor) -> np.ndarray:
    """mids: [255] float32 sorted -> [65536] uint8: codes of the lowest value with each top-16-bit pattern."""
    return _start_codes(mids.numpy().astype(np.float32).tobytes())


@njit(cache=True, inline="always")
def _round(x, start, mids):
    c = np.int32(start[np.uint32(np.float32(x).view(np.uint32)) >> 16])
    # one branch-free step (compare-and-add): within [-1, 1] no top-16-bit interval holds two
    # midpoints; tests pin this to torch.bucketize at every edge
    c += np.int32(mids[min(c, 254)] <= x) & np.int32(c < 255)
    return np.uint8(c)


@njit(cache=True)
def _round_all(x, start, mids):
    out = np.empty(x.size, dtype=np.uint8)
    for i in range(x.size):
        out[i] = _round(x[i], start, mids)
    return out


def round_to_map(x: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """x: [n] float32 -> [n] uint8, the kernel's rounding alone (tests pin it to torch.bucketize(right=True))."""
    return torch.from_numpy(_round_all(x.numpy(), start_codes(mids), mids.numpy()))


@njit(cache=True, parallel=True)
def _step(p, g, c1, a1, c2, a2, t1, m1, s1, t2, m2, s2, block, b2, w1, w2, eps, wd, decay, decoupled, step_size,
          bc2_sqrt):
    n = p.size
    nb = a1.size
    for b in prange(nb):
        lo = b * block
        hi = min(lo + block, n)
        m = np.empty(hi - lo, dtype=np.float32)
        v = np.empty(hi - lo, dtype=np.float32)
        mx1 = F32(0.0)
        mx2 = F32(0.0)
        old1 = a1[b]
        old2 = a2[b]
        for j in range(lo, hi):
            gj = g[j]
            pj = p[j]
            if wd != 0.0:
                if decoupled:
                    pj = pj * decay
                else:
                    gj = gj + wd * pj
            mj = t1[c1[j]] * old1
            vj = t2[c2[j]] * old2
            mj = mj + w1 * (gj - mj)  # torch's lerp for weight < 0.5
            vj = vj * b2 + w2 * (gj * gj)
            p[j] = pj - step_size * (mj / (math.sqrt(vj) / bc2_sqrt + eps))
            m[j - lo] = mj
            v[j - lo] = vj
            mx1 = max(mx1, abs(mj))
            mx2 = max(mx2, vj)
        a1[b] = mx1
        a2[b] = mx2
        d1 = mx1 if mx1 > 0 else F32(1.0)
        d2 = mx2 if mx2 > 0 else F32(1.0)
        for j in range(lo, hi):
            c1[j] = _round(m[j - lo] / d1, s1, m1)
            c2[j] = _round(v[j - lo] / d2, s2, m2)


def adam8bit_step(p, g, codes1, absmax1, codes2, absmax2, map1, map2, block, *, lr, beta1, beta2, eps,
                  weight_decay, decoupled, step) -> bool | None:
    """In place on p [n] (float32), codes [blocks * block] (uint8) and absmax [blocks]; None where the
    kernel does not apply (not float32, not contiguous, not on the CPU) and the caller runs torch."""
    ts = (p, g, codes1, absmax1, codes2, absmax2)
    if p.dtype != torch.float32 or g.dtype != torch.float32 or any(t.device.type != "cpu" or not t.is_contiguous() for t in ts):
        return None
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    _step(p.view(-1).numpy(), g.view(-1).numpy(), codes1.numpy(), absmax1.numpy(), codes2.numpy(), absmax2.numpy(),
          map1.values.numpy(), map1.mids.numpy(), start_codes(map1.mids),
          map2.values.numpy(), map2.mids.numpy(), start_codes(map2.mids),
          block, F32(beta2), F32(1 - beta1), F32(1 - beta2), F32(eps), F32(weight_decay), F32(1 - lr * weight_decay),
          decoupled, F32(lr / bc1), F32(bc2_sqrt))  # scalars formed in double, then float32, as torch does
    return True
