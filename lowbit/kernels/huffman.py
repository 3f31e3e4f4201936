"""Canonical Huffman decoding with numba: core/huffman.py's reference loop, compiled.

The same walk, bit by bit: extend the code one bit, and when it falls inside the codes of the
current length (code - first[l] < count[l]) emit symbols[index + code - first[l]]. Pinned to
the pure-Python loop by tests/test_deep_compression.py.
"""
from __future__ import annotations

import numpy as np
from numba import njit

MAX_LENGTH = 32


@njit(cache=True)
def _decode(buf, first, count, symbols, n, out):
    nbits = buf.shape[0] * 8
    pos = 0
    for i in range(n):
        code = 0
        index = 0
        found = False
        for length in range(1, MAX_LENGTH + 1):
            if pos >= nbits:
                return i  # truncated
            code = (code << 1) | ((buf[pos >> 3] >> (7 - (pos & 7))) & 1)
            pos += 1
            if code - first[length] < count[length]:
                out[i] = symbols[index + code - first[length]]
                found = True
                break
            index += count[length]
        if not found:
            return -1 - i  # corrupt
    return n


def huffman_decode(buf: np.ndarray, first: np.ndarray, count: np.ndarray, symbols: np.ndarray,
                   n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.int64)
    done = _decode(buf, first, count, symbols, n, out)
    if done < 0:
        raise ValueError(f"invalid Huffman code at symbol {-1 - done} (corrupt data)")
    if done < n:
        raise ValueError(f"Huffman stream ends after {done} of {n} symbols (truncated data)")
    return out
