"""Optional fast paths. Each is pinned by tests/test_kernels.py, bit for bit, to
the pure-torch reference it replaces, and none is the only implementation:
a kernel returns None where it does not apply and the caller runs the reference.

    encode_nearest   one chunk of scaled values -> codes (torch ops)
    quantize_rows    a whole tensor -> packed codes, scales, zeros in one pass
                     (numba; None when numba is not installed)
"""
from __future__ import annotations

import functools

from .encode import encode_nearest

__all__ = ["encode_nearest", "fused_backend", "quantize_rows"]


def quantize_rows(x, n, g, fmt, symmetric, scale_format, integer_zero):
    """See fused.quantize_rows; None where it does not apply or numba is missing."""
    fused = _fused()
    return None if fused is None else fused.quantize_rows(x, n, g, fmt, symmetric, scale_format, integer_zero)


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
