"""y = x @ W^T from a QTensor's packed codes, without materializing W (C++ AVX-512 kernels).

The kernels (csrc/qmatmul.cpp) are compiled on first use with torch.utils.cpp_extension
(g++ and the `ninja` package), cached in torch's extensions directory
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), and used only when the CPU has
AVX-512 (checked at run time). Where anything is missing, compilation fails, or the weight's
scheme is not covered, `linear()` returns None and QuantLinear runs its torch path
(dequantize, then F.linear), which stays the reference. LOWBIT_KERNELS=0 turns them off.

Covered: 2-D weights whose codes are
    4-bit, any format (int4, uint4, nf4, fp4_e2m1: decoded through a 16-entry table),
        symmetric or affine, groups that are multiples of 32 along the input axis (the last
        group may be shorter) or of 16 (nvfp4), per channel or per tensor
    any of these formats in groups along the output axis (HQQ's layout; the group size a
        multiple of 4 rows): x is scaled per row group before the kernel reads the codes
    int8 / uint8, fp8_e4m3 / fp8_e5m2, per channel, per tensor or in such groups
and scales stored as float32, float16 or bfloat16 (read as stored), or anything else
scale_values() reads (e8m0, fp8 scales, nf4-dq's double-quantized scales, a tensor scale):
those are widened to float32 once per weight and kept in the plan.

Routes, by the number of tokens M (rows of x):
    M <= GEMV_MAX_TOKENS   gemv: reads the codes once for up to 4 tokens at a time, float32 FMA;
                           bf16 input and a 4-bit table bf16 holds exactly (int4, uint4, fp4):
                           gemv_bf16, AVX512-BF16 dot products (exact products, float32 sums)
                           where the CPU has them; other bf16/fp16 input is widened to float32
    larger M (prefill)     bf16/fp16 input and codes gemm_i8 reads as bytes (uint4, int4, fp4 e2m1,
                           uint8, int8 exactly; nf4 through a fitted byte table, within 1/254 of
                           the largest level; fp8 through a 256-byte table on the format's int8
                           grid, AVX512-VBMI) in groups of 32k: gemm_i8 (csrc/qgemm_i8.cpp), each
                           token's x quantized to int8 per 64-block (32 for groups of 32),
                           AVX512-VNNI dot products; otherwise (groups of 16, output-axis groups)
                           dequantize once per call to bf16 (bf16 input) or float32, into a reused
                           per-thread buffer, then F.linear

Activations (LOWBIT_ACTIVATIONS, or `with qmatmul.activations("int8" | "float" | "auto"):`):
    auto (default)  int8 for bf16/fp16 prefill only, on every code gemm_i8 reads (the levels of nf4
                    and fp8 rounded to 8 bits: GemmCodes.exact). A bf16 GEMM at prefill sizes is compute-bound,
                    so dequantize-then-GEMM cannot beat the bf16 model; int8 dot products run twice
                    the products per instruction. The activations' rounding (2^-8 of each 64-block's
                    max) is of the order of bf16's own (2^-9 of each value); docs/benchmarks.md
                    measures the perplexity it costs. float32 input stays exact: lowbit's
                    evaluations of fp32 models are not changed by the kernels.
    int8            int8 for every float input, prefill and decode
                    (the decode GEMV of uint4/int4
                    codes in groups of 64k on VNNI, as llama.cpp quantizes its activations, Q8_0).
    float           no int8 anywhere: prefill dequantizes (the reference route).
tests/test_qmatmul.py checks the int8 kernels against float64 with the same quantized x.

LOWBIT_PREFILL=bf16 (opt-in, default off) runs float32 prefill through the bf16 route too (where
the activations setting does not take it to int8): x and W rounded to bf16, bf16 GEMM, result
widened back to float32. That changes an fp32 model's numerics (about 2^-8 relative per product;
tests/test_qmatmul.py states the bound), so it is never the default.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..formats import Format


GEMV_MAX_TOKENS = 16
TABLE4, INT8, UINT8, FP8_E4M3, FP8_E5M2 = range(5)

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / "qmatmul.cpp", _CSRC / "qgemm_i8.cpp"]  # common.h: included by both
_build_error: str | None = None


def _prefill_setting() -> bool:
    v = os.environ.get("LOWBIT_PREFILL", "")
    if v not in ("", "fp32", "bf16"):
        raise ValueError(f"LOWBIT_PREFILL={v!r}: expected 'bf16' (float32 prefill through the bf16 GEMM) or "
                         "'fp32' / unset (the default: prefill in the input's dtype)")
    return v == "bf16"


PREFILL_BF16 = _prefill_setting()  # read once, at import


ACTIVATION_MODES = ("auto", "int8", "float")


def _activations_setting() -> str:
    v = os.environ.get("LOWBIT_ACTIVATIONS", "") or "auto"
    if v not in ACTIVATION_MODES:
        raise ValueError(f"LOWBIT_ACTIVATIONS={v!r}: expected one of {', '.join(ACTIVATION_MODES)} (see "
                         "lowbit/kernels/qmatmul.py)")
    return v


_ACTIVATIONS = [_activations_setting()]


@contextlib.contextmanager
def activations(mode: str):
    """Within the block, the kernels quantize activations to int8 as `mode` says (LOWBIT_ACTIVATIONS)."""
    if mode not in ACTIVATION_MODES:
        raise ValueError(f"activations({mode!r}): expected one of {', '.join(ACTIVATION_MODES)}")
    before, _ACTIVATIONS[0] = _ACTIVATIONS[0], mode
    try:
        yield
    finally:
        _ACTIVATIONS[0] = before


def int8_activations(enabled: bool = True):
    """activations("int8") (or "float" when not enabled)."""
    return activations("int8" if enabled else "float")


def _int8(x: torch.Tensor, prefill: bool) -> bool:
    mode = _ACTIVATIONS[0]
    return mode == "int8" or (mode == "auto" and prefill and x.dtype != torch.float32)


_SCRATCH = threading.local()


GEMM_FOUR, GEMM_UINT8, GEMM_INT8, GEMM_LUT8 = 0, 2, 3, 4


@dataclass
class GemmCodes:
    """How gemm_i8 reads a weight's codes: as bytes u (4-bit codes through `table`, 16 uint8; 8-bit
    codebooks through 256), the level (u - offset) * scale_mul. exact: the levels are the format's
    (else rounded to 8 bits: nf4's fitted table, fp8's int8 grid)."""
    kind: int
    table: torch.Tensor | None
    offset: float
    scale_mul: float
    exact: bool


@dataclass
class Plan:
    """What the kernels read for one weight [N, K]: packed codes (pack_bits_le layout, row
    major), scales and zeros [N * G] (float32, float16 or bfloat16, the same dtype), a 16-entry
    table for 4-bit codes. nn/kernel_plan.py makes one from a QTensor."""
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    table: torch.Tensor
    N: int
    K: int
    group: int
    decoder: int
    scale_mul: float
    source: tuple  # the QTensor's tensors this plan reads: a plan is reused only while they are
    covered: bool = True  # False: no kernel covers this weight (remembered, so not checked again)
    bf16_gemv: bool = False  # bf16 input may take gemv_bf16 (4-bit codes, table exact in bf16, CPU has BF16)
    # Output-axis groups (HQQ's layout) of row_group rows: scales, zeros and their product z * s,
    # [ceil(N / row_group), K] float32, applied to x per row group; the kernel reads the codes
    # with unit `scales`.
    row_group: int = 0
    col_scales: torch.Tensor | None = None
    col_zeros: torch.Tensor | None = None
    col_shift: torch.Tensor | None = None
    i8_gemv: bool = False  # int8 activations may take gemv_i8 (uint4/int4 codes, groups of 64k, CPU has VNNI)
    i8_gemm: GemmCodes | None = None  # prefill may take gemm_i8, reading the codes so (groups of 32k, VNNI)


def decoder(fmt: Format) -> tuple[int | None, torch.Tensor, float]:
    """-> (decoder id or None where no kernel reads this format's codes, 16-entry table for
    4-bit codes, factor folded into the scales)."""
    codes = torch.arange(256, dtype=torch.uint8)
    name, bits = fmt.name, fmt.bits
    if bits == 4:
        return TABLE4, fmt.decode(codes[:16]).float().contiguous(), 1.0
    no = torch.zeros(16)
    if bits != 8:
        return None, no, 1.0
    # 8-bit formats the kernel widens by instruction: check the format decodes codes that way
    values = fmt.decode(codes).float()
    if name == "fp8_e4m3":
        return FP8_E4M3, no, 256.0  # the kernel widens e4m3 through fp16, which scales by 1/256
    if name == "fp8_e5m2":
        return FP8_E5M2, no, 1.0
    if torch.equal(values, codes.view(torch.int8).float()):
        return INT8, no, 1.0
    if torch.equal(values, codes.float()):
        return UINT8, no, 1.0
    return None, no, 1.0


def linear(x: torch.Tensor, p: Plan | None, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x: [..., K] float32/bf16/fp16 -> y: [..., N] in x's dtype, or None where the kernel does
    not apply (no plan, a tensor off the CPU, gradients wanted, autocast on)."""
    if p is None or not p.covered or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if (torch.is_grad_enabled() and x.requires_grad) or torch.is_autocast_enabled("cpu") or x.shape[-1] != p.K:
        return None
    x2 = x.reshape(-1, p.K)
    if x2.shape[0] <= GEMV_MAX_TOKENS:
        if p.row_group:
            y = _gemv_row_groups(x2.float(), p)
        elif p.i8_gemv and _int8(x, prefill=False):
            y = ops().gemv_i8(x2.float().contiguous(), p.codes, p.scales, p.zeros, p.table, p.N, p.group)
        elif p.bf16_gemv and x.dtype == torch.bfloat16:  # bf16 products, float32 sums: no widening copy
            y = ops().gemv_bf16(x2.contiguous(), p.codes, p.scales, p.zeros, p.table, p.N, p.group)
        else:
            y = ops().gemv(x2.float().contiguous(), p.codes, p.scales, p.zeros, p.table, p.N, p.group, p.decoder,
                           p.scale_mul, 0)
        y = y if x.dtype == torch.float32 else y.to(x.dtype)
        if bias is not None:
            y += bias.to(y.dtype)
    elif p.i8_gemm is not None and _int8(x, prefill=True):
        xi = x2 if x.dtype in (torch.float32, torch.bfloat16) else x2.float()  # fp16: widened, not narrowed
        y = gemm_i8(xi.contiguous(), p)
        if bias is not None:
            y += bias.to(y.dtype)
        y = y.to(x.dtype)
    else:
        bf16 = x.dtype == torch.bfloat16 or (PREFILL_BF16 and x.dtype == torch.float32)
        dtype = torch.bfloat16 if bf16 else torch.float32
        w = dequantize(p, dtype, _scratch(p.N * p.K, dtype).view(p.N, p.K))
        xw = x2.to(dtype) if bf16 else x2
        y = F.linear(xw, w.to(xw.dtype), None if bias is None else bias.to(xw.dtype)).to(x.dtype)
    return y.reshape(*x.shape[:-1], p.N)


def gemm_i8(x: torch.Tensor, p: Plan) -> torch.Tensor:
    """x [M, K] float32 or bf16 @ W^T in float32, x quantized to int8 per 64-block (csrc/qgemm_i8.cpp)."""
    c = p.i8_gemm
    return ops().gemm_i8(x, p.codes, p.scales, p.zeros, c.table, p.N, p.group, c.kind, c.offset,
                         c.scale_mul * p.scale_mul)


def _gemv_row_groups(x: torch.Tensor, p: Plan) -> torch.Tensor:
    """x [M, K] float32 @ W^T for output-axis groups: y[:, r] = q_r . (s_g x) - (z_g s_g) . x, g = r // rg
    (csrc/qmatmul.cpp, top)."""
    return ops().gemv(x.contiguous(), p.codes, p.scales, None, p.table, p.N, p.group, p.decoder, p.scale_mul,
                      p.row_group, p.col_scales, p.col_shift)


def dequantize(p: Plan, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight [N, K] in float32 or bfloat16, the same values as QTensor.dequantize(dtype),
    written into `out` when given (contiguous, that dtype and shape)."""
    out = torch.empty(p.N, p.K, dtype=dtype) if out is None else out
    if p.row_group:  # decoded codes, then (code - z) * s per row group as QTensor.dequantize computes it
        # in inference mode: `out` may be the reused scratch buffer, made under inference_mode
        with torch.inference_mode():
            w = out if dtype == torch.float32 else torch.empty(p.N, p.K)
            ops().dequantize(p.codes, p.scales, None, p.table, p.N, p.K, p.group, p.decoder, p.scale_mul, w)
            for g0 in range(0, p.N, p.row_group):
                rows = w[g0:g0 + p.row_group]
                if p.col_zeros is not None:
                    rows.sub_(p.col_zeros[g0 // p.row_group])
                rows.mul_(p.col_scales[g0 // p.row_group])
            if w is not out:
                out.copy_(w)
        return out
    ops().dequantize(p.codes, p.scales, p.zeros, p.table, p.N, p.K, p.group, p.decoder, p.scale_mul, out)
    return out


def _scratch(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused per-thread buffer of n elements: a fresh 32 MB tensor per prefill call costs
    as much in page faults as the dequantization itself. Holds the largest weight seen."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        buf = bufs[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n]


@functools.cache
def has_i8() -> bool:
    """The kernels are built and this CPU has AVX512-VNNI (gemv_i8 runs)."""
    return ops() is not None and ops().available_i8()


@functools.cache
def has_lut8() -> bool:
    """gemm_i8 can read 8-bit codebooks (fp8) through a 256-byte table: AVX512-VNNI and -VBMI."""
    return has_i8() and ops().available_lut8()


@functools.cache
def has_bf16() -> bool:
    """The kernels are built and this CPU has AVX512-BF16 (gemv_bf16 runs)."""
    return ops() is not None and ops().available_bf16()


def backend() -> str:
    """'c++ avx512 (<extension name>)', or why the kernels are off."""
    if ops() is not None:
        return f"c++ avx512{'+bf16' if has_bf16() else ''} ({_name()})"
    return _build_error or "off"


@functools.cache
def ops():
    """torch.ops.lowbit_qmatmul once built and loaded on an AVX-512 CPU, else None."""
    global _build_error
    if os.environ.get("LOWBIT_KERNELS", "1") == "0":
        _build_error = "off (LOWBIT_KERNELS=0)"
        return None
    try:
        from torch.utils.cpp_extension import load
        _ninja_on_path()
        logging.getLogger(__name__).info("building or loading the qmatmul kernels (a first build takes a minute)")
        load(name=_name(), sources=[str(f) for f in _SOURCES], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the torch path does the same work
        _build_error = f"off (build failed: {type(e).__name__}: {str(e)[:200]})"
        return None
    lib = torch.ops.lowbit_qmatmul
    if not lib.available():
        _build_error = "off (this CPU lacks AVX-512)"
        return None
    return lib


def _ninja_on_path() -> None:
    """torch runs `ninja` from PATH; a venv used without activating it has the PyPI package's
    binary off PATH, so put it there."""
    if shutil.which("ninja") is None:
        import ninja  # the PyPI package: its binary lives in ninja.BIN_DIR
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _name() -> str:
    # The source's hash in the name: an edited kernel builds afresh instead of reusing the cache.
    h = hashlib.sha256()
    for f in [*_SOURCES, _CSRC / "common.h"]:
        h.update(f.read_bytes())
    return "lowbit_qmatmul_" + h.hexdigest()[:12]
