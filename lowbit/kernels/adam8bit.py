"""One fused pass of block-wise 8-bit Adam with numba: decode both moments, update them and
the parameter, find each block's new absmax and round the moments back to their maps
(a positive second moment never to 0, as lowbit.optim.blockwise.quantize_second_moment),
blocks in parallel. lowbit/optim/adam.py's torch path is the reference
(tests/test_optim.py pins this kernel to it).

Rounding to the nearest of 256 sorted map values is the step that costs: a binary search
is 8 unpredictable branches per value. Instead the top 16 bits of x's float32 pattern
(sign, exponent, 7 mantissa bits) index a table. Within [-1, 1] the maps' values lie further
apart than a bf16 ulp, so each such interval holds at most one midpoint, and one int32 entry
says it all: the code at the interval's low end (bits 17 and up) and where in the interval
the next code starts (the low 16 bits of that midpoint, 0x10000 where none). Magnitudes below
the maps' smallest midpoint all round alike and those above 1 too, so the table only spans
the patterns between (about 2 x 2,900 entries, 23 KB: it stays in the L1 cache, where a
table of all 65,536 patterns and a second look-up of the midpoint did not). Ties go up, as
torch.bucketize(right=True).

Speed (why the step kernel reads its maps as module constants and takes the absmax as an
integer maximum): LLVM vectorizes a loop only when it can prove the table loads do not alias
the stores; numba's array arguments carry no such promise, constant globals do. A float max
reduction is a serial dependency chain; for non-negative floats the IEEE pattern orders as
an unsigned integer, whose max vectorizes.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import njit, prange

from ..formats import get

F32 = np.float32
U32 = np.uint32
_NONE = 0x10000  # no midpoint inside the interval: the low 16 bits never reach it


@functools.lru_cache(maxsize=8)
def _split_table(mids_bytes: bytes) -> tuple[int, int, np.ndarray]:
    mids = np.frombuffer(mids_bytes, dtype=np.float32)
    if not (np.all(np.diff(mids) > 0) and np.all(np.abs(mids) < 1)):
        raise ValueError("adam8bit: the map's midpoints must be increasing and inside (-1, 1)")
    lo = max(int(np.abs(mids).min().view(np.uint32) >> 16) - 1, 0)  # every magnitude below rounds alike
    hi = int(np.float32(1.0).view(np.uint32) >> 16)  # 1.0's interval; larger magnitudes clamp to it
    pats = np.arange(lo, hi + 1, dtype=np.uint32)
    table = []
    for sign in (0, 1):
        top = pats | (sign << 15)
        # the interval's lowest value: smallest magnitude if positive, largest if negative
        low = ((top << 16) | (0xFFFF if sign else 0)).view(np.float32)
        start = np.searchsorted(mids, low, side="right")
        nxt = mids[np.minimum(start, mids.size - 1)]
        nbits = nxt.view(np.uint32)
        inside = (start < mids.size) & ((nbits >> 16) == top)
        after = mids[np.minimum(start + 1, mids.size - 1)].view(np.uint32)
        if np.any(inside & (start + 1 < mids.size) & ((after >> 16) == top)):
            raise ValueError("adam8bit: two midpoints share a top-16-bit interval; the table needs a finer index")
        low16 = (nbits & 0xFFFF).astype(np.int64)
        thr = np.where(inside, 0xFFFF - low16 if sign else low16, _NONE)
        table.append((start.astype(np.int64) << 17) | thr)
    return lo, hi, np.concatenate(table).astype(np.int32)


def split_table(mids: torch.Tensor) -> tuple[int, int, np.ndarray]:
    """mids: [255] float32 sorted -> (lowest pattern, highest pattern, [2 n] int32 table; see the module doc)."""
    return _split_table(mids.numpy().astype(np.float32).tobytes())


@njit(cache=True, inline="always", error_model="numpy")
def _round(x, table, lo, hi, n):
    b = np.float32(x).view(np.uint32)
    sign = b >> U32(31)
    i = min(max((b & U32(0x7FFFFFFF)) >> U32(16), lo), hi) - lo + sign * n
    e = table[i]
    key = (b & U32(0xFFFF)) ^ (sign * U32(0xFFFF))  # negative: a larger pattern is a smaller value
    return np.uint8((e >> 17) + np.int32(np.int32(key) >= (e & 0x1FFFF)))


@njit(cache=True, error_model="numpy")
def _round_all(x, table, lo, hi, n):
    out = np.empty(x.size, dtype=np.uint8)
    for i in range(x.size):
        out[i] = _round(x[i], table, lo, hi, n)
    return out


def round_to_map(x: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """x: [n] float32 -> [n] uint8, the kernel's rounding alone (tests pin it to torch.bucketize(right=True))."""
    lo, hi, table = split_table(mids)
    return torch.from_numpy(_round_all(x.numpy(), table, U32(lo), U32(hi), U32(hi - lo + 1)))


def _map(name: str) -> tuple[np.ndarray, int, int, np.ndarray]:
    """values, and the rounding table of lowbit.optim's state maps, from the same format table"""
    v = get(name).values.float()
    lo, hi, table = split_table((v[1:] + v[:-1]) / 2)
    return v.numpy().copy(), lo, hi, table


# module constants: numba compiles them into the kernel (see the module doc)
_V1, _LO1, _HI1, _T1 = _map("dynamic8")
_V2, _LO2, _HI2, _T2 = _map("dynamic8_unsigned")
_MAPS = ("dynamic8", "dynamic8_unsigned")
# a positive second moment never rounds to 0 (lowbit.optim.blockwise.quantize_second_moment says
# why): where the nearest code is 0, code 1, the unsigned map's smallest positive level
assert _V2[0] == 0 and _V2[1] > 0


@njit(cache=True, parallel=True, error_model="numpy")
def _step(p, g, c1, a1, c2, a2, block, b2, w1, w2, eps, wd, decay, decoupled, step_size, bc2_sqrt):
    n = p.size
    nb = a1.size
    gwd = F32(0.0) if decoupled else wd  # Adam: L2 decay joins the gradient
    pdecay = decay if decoupled else F32(1.0)  # AdamW: the weight shrinks (x 1.0 is exact)
    lo1, hi1, n1 = U32(_LO1), U32(_HI1), U32(_HI1 - _LO1 + 1)
    lo2, hi2, n2 = U32(_LO2), U32(_HI2), U32(_HI2 - _LO2 + 1)
    for b in prange(nb):
        lo = b * block
        k = min(lo + block, n) - lo
        m = np.empty(k, dtype=np.float32)
        v = np.empty(k, dtype=np.float32)
        old1 = a1[b]
        old2 = a2[b]
        pb = p[lo:lo + k]  # block views: indices from 0 that numba knows are not negative
        gb = g[lo:lo + k]
        q1 = c1[lo:lo + k]
        q2 = c2[lo:lo + k]
        for j in range(k):
            pj = pb[j]
            gj = gb[j]
            if gwd != 0.0:
                gj = gj + gwd * pj
            pj = pj * pdecay
            mj = _V1[q1[j]] * old1
            vj = _V2[q2[j]] * old2
            mj = mj + w1 * (gj - mj)  # torch's lerp for weight < 0.5
            vj = vj * b2 + w2 * (gj * gj)
            pb[j] = pj - step_size * (mj / (math.sqrt(vj) / bc2_sqrt + eps))
            m[j] = mj
            v[j] = vj
        mb = m.view(np.uint32)
        vb = v.view(np.uint32)
        i1 = U32(0)
        i2 = U32(0)
        for j in range(k):
            i1 = max(i1, mb[j] & U32(0x7FFFFFFF))  # |m|
            i2 = max(i2, vb[j])  # v >= 0
        mx1 = U32(i1).view(np.float32)
        mx2 = U32(i2).view(np.float32)
        a1[b] = mx1
        a2[b] = mx2
        d1 = mx1 if mx1 > 0 else F32(1.0)
        d2 = mx2 if mx2 > 0 else F32(1.0)
        for j in range(k):
            q1[j] = _round(m[j] / d1, _T1, lo1, hi1, n1)
            c2j = _round(v[j] / d2, _T2, lo2, hi2, n2)
            q2[j] = max(c2j, np.uint8(v[j] > 0))  # never 0 for v > 0 (see above)


def adam8bit_step(p, g, codes1, absmax1, codes2, absmax2, map1, map2, block, *, lr, beta1, beta2, eps,
                  weight_decay, decoupled, step) -> bool | None:
    """In place on p [n] (float32), codes [blocks * block] (uint8) and absmax [blocks]; None where the
    kernel does not apply (not float32, not contiguous, not on the CPU, maps other than lowbit.optim's
    dynamic8 / dynamic8_unsigned) and the caller runs torch."""
    ts = (p, g, codes1, absmax1, codes2, absmax2)
    if p.dtype != torch.float32 or g.dtype != torch.float32 or any(t.device.type != "cpu" or not t.is_contiguous() for t in ts):
        return None
    if (map1.name, map2.name) != _MAPS:
        return None
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    _step(p.view(-1).numpy(), g.view(-1).numpy(), codes1.numpy(), absmax1.numpy(), codes2.numpy(), absmax2.numpy(),
          block, F32(beta2), F32(1 - beta1), F32(1 - beta2), F32(eps), F32(weight_decay), F32(1 - lr * weight_decay),
          decoupled, F32(lr / bc1), F32(bc2_sqrt))  # scalars formed in double, then float32, as torch does
    return True
