"""Fast paths. Each is pinned by tests/test_kernels.py, bit for bit, to the
pure-torch reference it replaces, and none is the only implementation: a kernel
returns None where it does not apply and the caller runs the reference.

    encode_nearest   one chunk of scaled values -> codes (torch ops)
    quantize_rows    a whole tensor -> packed codes, scales, zeros in one pass (numba)
    gptq_int_block   GPTQ's column loop over one block on an integer grid, rows in
                     parallel (numba; tests/test_gptq.py pins it to the torch loop)
    gptq_grid_block  the same on a GGML type's grid fitted up front (methods/gptq_ggml.py with
                     act_order; tests/test_gguf_calibrated.py pins it to the torch loop)
    qmatmul          x @ W^T straight from a QTensor's packed codes (C++ AVX-512, built at
                     first use; QuantLinear's fast path; tests/test_qmatmul.py pins it to
                     float64 dequantize-then-matmul)
    huffman_decode   canonical Huffman bit stream -> symbols (numba, huffman.py; core/huffman.py's
                     Python loop is the reference, tests/test_deep_compression.py pins it)
    adam8bit_step    one fused block-wise 8-bit Adam step (numba, adam8bit.py; lowbit.optim's
                     torch path is its reference, tests/test_optim.py pins it)
    ggml_fit         GGML blocks (Q2_K..Q6_K, IQ4_NL, Q4_0..Q8_0): search, round and pack in one pass per
                     block, blocks in parallel (numba, ggml.py; core.ggml_kquants / ggml_blocks' numpy
                     code is the reference, tests/test_ggml_fit_kernels.py pins it byte for byte)
    ggml_pack        those blocks with a solver's codes in place of round-to-nearest's

numba is a required dependency (pyproject.toml). The numba modules are imported on
first use, not with lowbit, because importing them costs about 1.5 s.
"""
from __future__ import annotations

import functools

from .encode import encode_nearest

__all__ = [
    "encode_nearest",
    "fused_backend",
    "ggml_fit",
    "ggml_pack",
    "gptq_grid_block",
    "gptq_int_block",
    "huffman_decode",
    "quantize_rows",
]


def quantize_rows(x, n, g, fmt, symmetric, scale_format, integer_zero):
    """See fused.quantize_rows; None where it does not apply."""
    return _fused().quantize_rows(x, n, g, fmt, symmetric, scale_format, integer_zero)


def gptq_int_block(W1, U1, S, Z, qmin, qmax):
    """See gptq_columns.int_block."""
    return _gptq_columns().int_block(W1, U1, S, Z, qmin, qmax)


def gptq_grid_block(W1, U1, S, O, levels, uniform, codes):
    """See gptq_columns.grid_block."""
    return _gptq_columns().grid_block(W1, U1, S, O, levels, uniform, codes)


def huffman_decode(buf, first, count, symbols, n):
    """See huffman.huffman_decode."""
    from . import huffman

    return huffman.huffman_decode(buf, first, count, symbols, n)


def ggml_fit(kind, x):
    """See ggml.fit; None where it does not apply."""
    return _ggml().fit(kind, x)


def ggml_pack(kind, blocks, L):
    """See ggml.pack."""
    return _ggml().pack(kind, blocks, L)


def fused_backend() -> str:
    """'numba <version>': what runs the fused kernel."""
    return f"numba {_fused().numba.__version__}"


@functools.cache
def _fused():
    from . import fused

    return fused


@functools.cache
def _gptq_columns():
    from . import gptq_columns

    return gptq_columns


@functools.cache
def _ggml():
    from . import ggml

    return ggml
