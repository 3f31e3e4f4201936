"""Optional fast paths. Each is pinned by tests/test_kernels.py, bit for bit, to
the pure-torch reference it replaces, and none is the only implementation:
a kernel returns None where it does not apply and the caller runs the reference.

    encode_nearest   one chunk of scaled values -> codes (torch ops)
    quantize_rows    a whole tensor -> packed codes, scales, zeros in one pass
                     (numba; None when numba is not installed)
    gptq_int_block   GPTQ's column loop over one block on an integer grid, rows in
                     parallel (numba; tests/test_gptq.py pins it to the torch loop)
    qmatmul          x @ W^T straight from a QTensor's packed codes (C++ AVX-512, built at
                     first use; QuantLinear's fast path; tests/test_qmatmul.py pins it to
                     float64 dequantize-then-matmul)
"""
from __future__ import annotations

import functools

from .encode import encode_nearest

__all__ = ["encode_nearest", "fused_backend", "quantize_rows", "gptq_int_block"]


def quantize_rows(x, n, g, fmt, symmetric, scale_format, integer_zero):
    """See fused.quantize_rows; None where it does not apply or numba is missing."""
    fused = _fused()
    return None if fused is None else fused.quantize_rows(x, n, g, fmt, symmetric, scale_format, integer_zero)


def gptq_int_block(W1, U1, S, Z, qmin, qmax):
    """See gptq_columns.int_block; None when numba is missing."""
    mod = _gptq_columns()
    return None if mod is None else mod.int_block(W1, U1, S, Z, qmin, qmax)


def fused_backend() -> str | None:
    """'numba <version>' when the fused kernel is available, else None."""
    fused = _fused()
    return None if fused is None else f"numba {fused.numba.__version__}"


@functools.cache
def _fused():
    try:
        from . import fused
    except ImportError:  # numba is an optional speed-up: the torch path does the same work
        return None
    return fused


@functools.cache
def _gptq_columns():
    try:
        from . import gptq_columns
    except ImportError:
        return None
    return gptq_columns
