"""One-pass quantize-and-pack with numba.

A tensor is read as rows of n values, each row cut into groups of g (the last
group of a row may be shorter). For each group the kernel takes the range
(absmax, or min and max), turns it into a scale and zero point exactly as
core/scales.py does, then divides, rounds half to even, clamps and writes the
packed codes (pack_bits_le's layout), touching each input value once from
memory. bf16 and fp16 inputs are read as 16-bit patterns and widened exactly,
value by value, so no float32 copy is made. Codes, scales and zero points are
bit for bit those of the pure-torch path (tests/test_kernels.py).

    quantize_int       int1..int8 / uint, symmetric or affine (integer zero too)
    quantize_fp8_e4m3  fp8_e4m3, symmetric
    quantize_table     <= 16-value tables (nf4, fp4_e2m1, ...), symmetric
    scale formats      fp32, fp16, bf16, and E8M0 for symmetric (mxfp4, mxint8, mxfp8)

The kernel reports a group it will not do (a NaN or Inf input, a scale of zero,
a scale or zero point beyond fp16/bf16) through `bad`; the caller then runs the
reference path, which raises its usual errors. No fast-math: every operation is
the IEEE float32 one the reference does.
"""
from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from ..formats import Format, IntFormat
from .encode import _table_bounds

u32 = np.uint32  # numba widens integer arithmetic to 64 bits; u32(...) around a result keeps
# the vectorized loops in 32-bit lanes
FP32, FP16, BF16, E8M0 = 0, 1, 2, 3  # scale formats the kernel rounds to
SCALE_FORMATS = {"fp32": FP32, "fp16": FP16, "bf16": BF16, "e8m0": E8M0}
ABS = u32(0x7FFFFFFF)
INF = u32(0x7F800000)
F0, F1 = np.float32(0.0), np.float32(1.0)
FP8_MAX = np.float32(448.0)
FP8_MAX_BITS = u32(0x43E00000)  # 448.0


@intrinsic
def _f32(typingctx, b):
    """uint32 bit pattern -> float32."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _f16(typingctx, h):
    """int16 float16 bit pattern -> its float32 value (exact; F16C where the CPU has it)."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.int16), codegen


@intrinsic
def _u32(typingctx, f):
    """float32 -> its uint32 bit pattern."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


def _bits(v):
    """One input value -> the bit pattern of its float32 value (numba only)."""
    raise NotImplementedError


@overload(_bits)
def _bits_impl(v):
    # numba has no 16-bit floats on the CPU, so half inputs arrive as 16-bit integers:
    # uint16 holds bfloat16 patterns and int16 float16 patterns (see quantize_rows).
    if v == types.float32:
        return lambda v: _u32(v)
    if v == types.uint16:
        return lambda v: u32(u32(v) << u32(16))
    if v == types.int16:
        return lambda v: _u32(_f16(v))
    return None


@njit(cache=True)
def _to_scale_format(v, fmt, is_scale):
    """core.scales.round_to for fp32, fp16 and bf16: (rounded float32, ok). Not ok where the
    reference would raise or clamp a value above the format's max, or for a zero or
    non-finite scale (which the reference divides by)."""
    if fmt == FP32:
        ok = abs(v) < np.float32(np.inf) and (v != F0 or not is_scale)
        return v, ok
    a = abs(v)
    if fmt == FP16:
        if not a <= np.float32(65504.0):
            return v, False
        if is_scale and a < np.float32(2.0**-24):
            a = np.float32(2.0**-24)
        if a < np.float32(2.0**-14):  # fp16 subnormals: multiples of 2^-24
            r = np.rint(a * np.float32(2.0**24)) * np.float32(2.0**-24)
        else:  # round the float32 pattern to 10 mantissa bits, ties to even
            b = _u32(a)
            r = _f32(u32((b + u32(0xFFF) + ((b >> u32(13)) & u32(1))) & u32(0xFFFFE000)))
    else:
        if not a <= np.float32(3.3895313892515355e38):
            return v, False
        if is_scale and a < np.float32(2.0**-133):
            a = np.float32(2.0**-133)
        b = _u32(a)  # bf16 is float32 with 16 fewer mantissa bits, subnormals included
        r = _f32(u32((b + u32(0x7FFF) + ((b >> u32(16)) & u32(1))) & u32(0xFFFF0000)))
    return (-r if _u32(v) >> u32(31) else r), True  # the sign of a zero point -0.0 too


@njit(cache=True)
def _floor_log2(v):
    """floor(log2 v) of a positive finite float32, subnormals included."""
    e = np.int64(_u32(v) >> u32(23))
    if e == 0:  # subnormal: scale it into the normal range, exactly
        return np.int64(_u32(v * np.float32(2.0**64)) >> u32(23)) - 127 - 64
    return e - 127


@njit(cache=True, inline="always")
def _symmetric_scale(m, qmax, fmt):
    """core.scales.symmetric_scale from max |x| as a bit pattern m: (scale, ok)."""
    amax = _f32(m) if m > 0 else F1
    if m >= INF:
        return F1, False
    if fmt == E8M0:  # OCP MX: 2^(floor(log2 amax) - floor(log2 qmax)), exponent in [-127, 127]
        e = min(max(_floor_log2(amax) - _floor_log2(qmax), -127), 127)
        return (_f32(u32(e + 127) << u32(23)) if e > -127 else _f32(u32(0x400000))), True
    return _to_scale_format(amax / qmax, fmt, True)


# Group loops index x[i0 + k] with unsigned integers: numba then skips its negative-index
# wraparound, and the loops vectorize to plain loads (slices would cost a reference count
# per group).

def _absmax(x, i0, n):
    """max |x[i0:i0+n]| as a float32 bit pattern (>= INF when the group holds NaN or Inf)."""
    raise NotImplementedError


@overload(_absmax, inline="always")
def _absmax_impl(x, i0, n):
    # |v| orders like the bits below the sign, for float32 and for both 16-bit floats; those
    # take the max in 16-bit lanes (twice as many per vector) and widen it once.
    if x.dtype == types.float32:
        return lambda x, i0, n: _absmax32(x, i0, n)
    if x.dtype == types.uint16:  # bfloat16
        return lambda x, i0, n: _bits(_absmax16(x, i0, n))
    if x.dtype == types.int16:  # float16
        return lambda x, i0, n: _bits(np.int16(_absmax16(x, i0, n)))
    return None


@njit(cache=True, inline="always")
def _absmax32(x, i0, n):
    m = u32(0)
    for k in range(n):
        b = u32(_u32(x[i0 + k]) & ABS)
        m = b if b > m else m
    return m


@njit(cache=True, inline="always")
def _absmax16(x, i0, n):
    m = np.uint16(0)
    for k in range(n):
        b = np.uint16(np.uint16(x[i0 + k]) & np.uint16(0x7FFF))
        m = b if b > m else m
    return m


@njit(cache=True, inline="always")
def _minmax(x, i0, n):
    """(min, max, finite) of x[i0:i0+n], compared as integers: a float32 pattern with its
    magnitude bits flipped when negative orders like the float."""
    lo = np.int32(0x7FFFFFFF)
    hi = np.int32(-0x80000000)
    for k in range(n):
        b = np.int32(_bits(x[i0 + k]))
        key = np.int32(b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF)))
        lo = key if key < lo else lo
        hi = key if key > hi else hi
    lo = lo ^ ((lo >> np.int32(31)) & np.int32(0x7FFFFFFF))
    hi = hi ^ ((hi >> np.int32(31)) & np.int32(0x7FFFFFFF))
    finite = u32(u32(lo) & ABS) < INF and u32(u32(hi) & ABS) < INF
    return _f32(u32(lo)), _f32(u32(hi)), finite


@njit(cache=True, inline="always")
def _int_params(x, i0, n, qmin, qmax, symmetric, integer_zero, fmt):
    """(scale, zero point, ok) of the group x[i0:i0+n] as core.scales computes them."""
    if symmetric:
        s, ok = _symmetric_scale(_absmax(x, i0, n), qmax, fmt)
        return s, F0, ok
    lo, hi, finite = _minmax(x, i0, n)  # affine_params
    if not finite:
        return F1, F0, False
    if integer_zero:
        lo = lo if lo < F0 else F0
        hi = hi if hi > F0 else F0
    width = hi - lo
    if width <= F0:
        s = abs(lo) if lo != F0 else F1
    else:
        s = width / (qmax - qmin)
    s, ok = _to_scale_format(s, fmt, True)
    z = qmin - lo / s
    if integer_zero:
        z = min(max(np.rint(z), qmin), qmax)
    z, ok_z = _to_scale_format(z, fmt, False)
    return s, z, ok and ok_z


@njit(cache=True)
def _int_code(v, s, z, lo, hi):
    """clamp(round(v / s + z), lo, hi) as an int32, ties to even. Symmetric schemes pass
    z = 0, which changes only the sign of a zero y, and so not the code."""
    y = _f32(_bits(v)) / s + z
    y = lo if y < lo else y
    y = hi if y > hi else y
    return np.int32(np.rint(y))


@njit(cache=True, inline="always")
def _encode_int(x, i0, n, s, z, lo, hi, bits, buf, out, o):
    """Codes of x[i0:i0+n] (two's complement, `bits` wide) -> out[o:], packed LSB first."""
    mask = np.int32((1 << bits) - 1)
    if bits == 8:
        for k in range(n):
            out[o + k] = np.uint8(_int_code(x[i0 + k], s, z, lo, hi) & mask)
    elif bits == 4:
        two = np.uint64(2)
        for k in range(n // two):
            c0 = _int_code(x[i0 + two * k], s, z, lo, hi) & mask
            c1 = _int_code(x[i0 + two * k + np.uint64(1)], s, z, lo, hi) & mask
            out[o + k] = np.uint8(c0 | (c1 << 4))
    else:
        for k in range(n):
            buf[k] = np.uint8(_int_code(x[i0 + k], s, z, lo, hi) & mask)
        _pack(buf, n, bits, out, o)


@njit(cache=True, inline="always")
def _pack(codes, n, bits, out, o):
    """codes[:n] of `bits` bits -> out[o:], LSB first (n * bits a multiple of 8; n and o
    unsigned, as every index in these loops)."""
    if bits == 4:
        two = np.uint64(2)
        for k in range(n // two):
            out[o + k] = codes[two * k] | (codes[two * k + np.uint64(1)] << np.uint8(4))
        return
    acc = np.uint64(0)  # any width: a 64-bit accumulator flushed a byte at a time
    filled = 0
    for k in range(n):
        acc |= np.uint64(codes[k]) << np.uint64(filled)
        filled += bits
        while filled >= 8:
            out[o] = np.uint8(acc & np.uint64(0xFF))
            o += np.uint64(1)
            acc >>= np.uint64(8)
            filled -= 8


BATCH = 2048  # values per task: a row's groups are fitted, then encoded, this many at a time


@njit(parallel=True, cache=True)
def quantize_int(x, n, g, bits, qmin, qmax, symmetric, integer_zero, fmt, codes, scales, zeros, bad):
    """x: flat [rows * n] -> codes (packed), and per group [rows * ceil(n / g)] scales,
    zeros (affine) and bad."""
    per_row = (n + g - 1) // g
    per_task = max(1, BATCH // g)  # groups
    tasks_per_row = (per_row + per_task - 1) // per_task
    tasks = x.size // n * tasks_per_row
    lo, hi = np.float32(qmin), np.float32(qmax)
    blocks = min(tasks, 1024)
    for blk in prange(blocks):
        buf = np.empty(g, np.uint8)
        for t in range(blk * tasks // blocks, (blk + 1) * tasks // blocks):
            r = t // tasks_per_row
            j0 = t % tasks_per_row * per_task
            j1 = min(per_row, j0 + per_task)
            # First every group's scale (independent chains that overlap), then the codes.
            ok = True
            for j in range(j0, j1):
                i0, length = np.uint64(r * n + j * g), np.uint64(min(g, n - j * g))
                s, z, good = _int_params(x, i0, length, lo, hi, symmetric, integer_zero, fmt)
                scales[r * per_row + j] = s
                if not symmetric:
                    zeros[r * per_row + j] = z
                bad[r * per_row + j] = not good
                ok = ok and good
            if not ok:
                continue
            for j in range(j0, j1):
                i0, length = np.uint64(r * n + j * g), np.uint64(min(g, n - j * g))
                s = scales[r * per_row + j]
                z = F0 if symmetric else zeros[r * per_row + j]
                _encode_int(x, i0, length, s, z, lo, hi, bits, buf, codes, i0 * np.uint64(bits) // np.uint64(8))


@njit(cache=True)
def _fp8_e4m3(y):
    """float32 -> fp8 E4M3FN code: nearest, ties to even, saturating at +-448 (torch's cast
    after clamping to +-448). Works on the magnitude bits, which order like |y|."""
    b = _u32(y)
    a = u32(b & ABS)
    a = a if a < FP8_MAX_BITS else FP8_MAX_BITS
    # below 2^-6: steps of 2^-9 (code 8 is the smallest normal). Adding 2^14, whose ulp is
    # 2^-9, rounds |y| to that step, ties to even; the low bits are then the code.
    sub = u32(_u32(_f32(a) + np.float32(16384.0)) - u32(0x46800000))
    # otherwise keep 3 mantissa bits, ties to even, and rebias the exponent from 127 to 7
    odd = u32(u32(a >> u32(20)) & u32(1))
    normal = u32(u32(u32(a + u32(0x7FFFF) + odd) >> u32(20)) - u32(960))
    mag = sub if a < u32(0x3C800000) else normal
    return np.uint8(mag | u32(u32(b >> u32(24)) & u32(0x80)))


@njit(parallel=True, cache=True)
def quantize_fp8_e4m3(x, n, g, fmt, codes, scales, bad):
    """Symmetric fp8_e4m3, scale absmax / 448: x flat [rows * n] -> codes, and per group
    [rows * ceil(n / g)] scales and bad."""
    per_row = (n + g - 1) // g
    per_task = max(1, BATCH // g)
    tasks_per_row = (per_row + per_task - 1) // per_task
    tasks = x.size // n * tasks_per_row
    for t in prange(tasks):
        r = t // tasks_per_row
        j0 = t % tasks_per_row * per_task
        j1 = min(per_row, j0 + per_task)
        ok = True
        for j in range(j0, j1):
            m = _absmax(x, np.uint64(r * n + j * g), np.uint64(min(g, n - j * g)))
            s, good = _symmetric_scale(m, FP8_MAX, fmt)
            scales[r * per_row + j] = s
            bad[r * per_row + j] = not good
            ok = ok and good
        if not ok:
            continue
        for j in range(j0, j1):
            i0, length = np.uint64(r * n + j * g), np.uint64(min(g, n - j * g))
            s = scales[r * per_row + j]
            for k in range(length):
                codes[i0 + k] = _fp8_e4m3(_f32(_bits(x[i0 + k])) / s)


@njit(parallel=True, cache=True)
def quantize_table(x, n, g, bits, qmax, signed, bounds, fmt, codes, scales, bad):
    """Symmetric schemes over a small table (nf4 and other <= 16-value codebooks, fp4_e2m1),
    scale absmax / qmax: code = #(y > t) over kernels.encode's thresholds t, of |y| with the
    sign as the top bit when `signed`. x flat [rows * n] -> codes, scales and bad per group."""
    per_row = (n + g - 1) // g
    per_task = max(1, BATCH // g)
    tasks_per_row = (per_row + per_task - 1) // per_task
    tasks = x.size // n * tasks_per_row
    blocks = min(tasks, 1024)
    top = np.uint8(bits - 1)
    for blk in prange(blocks):
        y = np.empty(per_task * g, np.float32)
        c = np.empty(per_task * g, np.uint8)
        for t in range(blk * tasks // blocks, (blk + 1) * tasks // blocks):
            r = t // tasks_per_row
            j0 = t % tasks_per_row * per_task
            j1 = min(per_row, j0 + per_task)
            ok = True
            for j in range(j0, j1):
                m = _absmax(x, np.uint64(r * n + j * g), np.uint64(min(g, n - j * g)))
                s, good = _symmetric_scale(m, qmax, fmt)
                scales[r * per_row + j] = s
                bad[r * per_row + j] = not good
                ok = ok and good
            if not ok:
                continue
            base = np.uint64(r * n + j0 * g)  # the task's groups are contiguous
            span = np.uint64(min(n, j1 * g) - j0 * g)
            for j in range(j0, j1):
                i0, length = np.uint64(r * n + j * g), np.uint64(min(g, n - j * g))
                s = scales[r * per_row + j]
                o = np.uint64((j - j0) * g)
                for k in range(length):
                    v = _f32(_bits(x[i0 + k])) / s
                    y[o + k] = abs(v) if signed else v
            for k in range(span):
                c[k] = 0
            for b in bounds:  # one pass per threshold over the task, in cache
                for k in range(span):
                    c[k] += y[k] > b
            if signed:
                for k in range(span):
                    c[k] |= np.uint8(_bits(x[base + k]) >> u32(31)) << top
            _pack(c, span, bits, codes, base * np.uint64(bits) // np.uint64(8))


# Input dtype -> the numpy array the kernels read (16-bit floats as their bit patterns).
_VIEWS = {torch.float32: torch.float32, torch.bfloat16: torch.uint16, torch.float16: torch.int16}
_LOCK = threading.Lock()  # numba's default thread pool must not be entered from two threads at once


def quantize_rows(x: torch.Tensor, n: int, g: int, fmt: Format, symmetric: bool, scale_format: str,
                  integer_zero: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """x: contiguous float32/bf16/fp16, read as rows of n values cut into groups of g
    (the last group of a row shorter when g does not divide n)
    -> (codes: uint8 [numel * bits / 8] packed, scales [groups], zeros [groups] or None),
    scales and zeros stored as core.scales.store stores them (float32, float16, bfloat16, or
    uint8 E8M0 codes), groups in row-major order; or None where the kernel does not apply.

        >>> codes, s, z = quantize_rows(w, w.shape[1], 128, formats.get("int4"), True, "fp32", False)
    """
    fp8 = fmt.name == "fp8_e4m3" and symmetric
    int_fmt = isinstance(fmt, IntFormat) and fmt.step == 1.0 and fmt.bits <= 8
    table = None if fp8 or int_fmt or not symmetric else _table_bounds(fmt)
    if not (fp8 or int_fmt or table) or scale_format not in SCALE_FORMATS or x.dtype not in _VIEWS:
        return None
    if scale_format == "e8m0" and not symmetric:  # the reference raises: no zero points in E8M0
        return None
    if x.device.type != "cpu" or not x.is_contiguous() or x.numel() == 0 or not 1 <= g <= n:
        return None
    bits = fmt.bits
    if n * bits % 8 or g * bits % 8 or x.numel() % n:  # every group must start on a byte of the codes
        return None
    a = x.detach().reshape(-1).view(_VIEWS[x.dtype]).numpy()
    rows, per_row = a.size // n, -(-n // g)
    scales = np.empty(rows * per_row, np.float32)
    zeros = np.empty(0 if symmetric else rows * per_row, np.float32)
    bad = np.zeros(rows * per_row, np.bool_)
    with _LOCK:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        if fp8:
            codes = np.empty(a.size, np.uint8)
            quantize_fp8_e4m3(a, n, g, SCALE_FORMATS[scale_format], codes, scales, bad)
        elif table:
            codes = np.empty(a.size * bits // 8, np.uint8)
            quantize_table(a, n, g, bits, np.float32(fmt.max), table[0], np.array(table[1], np.float32),
                           SCALE_FORMATS[scale_format], codes, scales, bad)
        else:
            codes = np.empty(a.size * bits // 8, np.uint8)
            quantize_int(a, n, g, bits, fmt.qmin, fmt.qmax, symmetric, integer_zero,
                         SCALE_FORMATS[scale_format], codes, scales, zeros, bad)
    if bad.any():
        return None
    return torch.from_numpy(codes), _stored(scales, scale_format), None if symmetric else _stored(zeros, scale_format)


def _stored(values: np.ndarray, scale_format: str) -> torch.Tensor:
    """float32 values already in the scale format -> the tensor that holds them (core.scales.store)."""
    if scale_format == "e8m0":  # powers of two 2^e -> codes e + 127
        return torch.from_numpy((np.frexp(values)[1] + 126).astype(np.uint8))
    return torch.from_numpy(values).to({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[scale_format])
