"""Canonical Huffman coding of small-alphabet symbol streams (Deep Compression's third stage).

A code is stored as one length per symbol (uint8, 0 = the symbol never occurs): the canonical
code (DEFLATE's rule) assigns codes in order of (length, symbol), so the lengths alone rebuild the
encoder and the decoder. Bits are written most significant first into bytes, the last byte padded
with zeros; the decoder is told how many symbols to read.

    lengths = huffman_lengths(torch.bincount(symbols, minlength=32))
    data = huffman_encode(symbols, lengths)             # uint8 [ceil(bits / 8)]
    assert torch.equal(huffman_decode(data, lengths, symbols.numel()), symbols)

Encoding is vectorised over chunks (numpy); decoding walks the bits one symbol at a time, in
numba (kernels.huffman_decode) with the pure-Python loop here as its reference and fallback.
"""
from __future__ import annotations

import heapq

import numpy as np
import torch

MAX_LENGTH = 32  # codes are held in uint64 words; a 32-symbol alphabet can need up to 31 bits


def huffman_lengths(counts: torch.Tensor) -> torch.Tensor:
    """counts: [n_symbols] occurrences -> code lengths uint8 [n_symbols] (0 for unused symbols).

    One used symbol gets a 1-bit code (a stream still needs a bit per symbol to be counted).
    Ties are broken by symbol order, so the same counts always give the same lengths."""
    c = torch.as_tensor(counts).long()
    if c.dim() != 1 or c.numel() == 0 or bool((c < 0).any()):
        raise ValueError(f"huffman_lengths needs non-negative counts of shape [n_symbols], got {tuple(c.shape)}")
    lengths = [0] * c.numel()
    heap = [(int(n), s, [s]) for s, n in enumerate(c.tolist()) if n > 0]
    if len(heap) == 1:
        lengths[heap[0][1]] = 1
    heapq.heapify(heap)
    order = c.numel()  # tie-breaker for merged nodes, after every leaf
    while len(heap) > 1:
        n1, _, s1 = heapq.heappop(heap)
        n2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (n1 + n2, order, s1 + s2))
        order += 1
    if max(lengths) > MAX_LENGTH:
        raise ValueError(f"a Huffman code of {max(lengths)} bits exceeds {MAX_LENGTH}: use a smaller alphabet")
    return torch.tensor(lengths, dtype=torch.uint8)


def canonical_codes(lengths: torch.Tensor) -> np.ndarray:
    """Code lengths [n] -> canonical codes uint64 [n] (DEFLATE's assignment; 0 where length is 0)."""
    L = np.asarray(torch.as_tensor(lengths), dtype=np.int64)
    _check_lengths(L)
    codes = np.zeros(len(L), dtype=np.uint64)
    code, prev = 0, 0
    for s in sorted((s for s in range(len(L)) if L[s] > 0), key=lambda s: (L[s], s)):
        code <<= int(L[s]) - prev
        prev = int(L[s])
        codes[s] = code
        code += 1
    return codes


def _check_lengths(L: np.ndarray) -> None:
    if L.ndim != 1 or (L > MAX_LENGTH).any() or (L < 0).any():
        raise ValueError(f"Huffman code lengths must be a 1-D array of 0..{MAX_LENGTH}")
    used = L[L > 0]
    kraft = sum(2.0 ** -int(n) for n in used)
    if len(used) and kraft > 1.0:
        raise ValueError(f"Huffman code lengths are not a prefix code (Kraft sum {kraft} > 1)")


def encoded_bits(symbols: torch.Tensor, lengths: torch.Tensor) -> int:
    """Bits the stream takes under the code (before padding to whole bytes)."""
    return int(torch.as_tensor(lengths).long()[symbols.long()].sum())


def huffman_encode(symbols: torch.Tensor, lengths: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """symbols: int [n] in 0..len(lengths)-1 -> uint8 [ceil(bits / 8)], codes written MSB first."""
    L = torch.as_tensor(lengths).long()
    s = symbols.reshape(-1).long()
    if s.numel() and (int(s.min()) < 0 or int(s.max()) >= L.numel() or bool((L[s] == 0).any())):
        raise ValueError("huffman_encode: a symbol has no code (outside the alphabet or counted 0 times)")
    codes = canonical_codes(L)
    Ln = L.numpy()
    out, carry = [], np.zeros(0, dtype=np.uint8)
    for i in range(0, s.numel(), chunk):
        sym = s[i:i + chunk].numpy()
        c, n = codes[sym], Ln[sym]
        width = int(n.max())
        # bit k (MSB first) of each code, in a [symbols, width] grid; keep the first n of each row
        shifts = (n[:, None] - 1 - np.arange(width)[None, :])
        bits = ((c[:, None] >> np.maximum(shifts, 0).astype(np.uint64)) & np.uint64(1)).astype(np.uint8)
        bits = np.concatenate([carry, bits[shifts >= 0]])
        whole = len(bits) // 8 * 8
        out.append(np.packbits(bits[:whole]))
        carry = bits[whole:]
    if len(carry):
        out.append(np.packbits(carry))
    return torch.from_numpy(np.concatenate(out) if out else np.zeros(0, dtype=np.uint8))


def decode_tables(lengths: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical decoding tables: for each length l, the first code (first[l]), how many codes
    (count[l]) and where its symbols start in `symbols` (ordered by (length, symbol))."""
    L = np.asarray(torch.as_tensor(lengths), dtype=np.int64)
    _check_lengths(L)
    order = np.array(sorted((s for s in range(len(L)) if L[s] > 0), key=lambda s: (L[s], s)), dtype=np.int64)
    count = np.bincount(L[order], minlength=MAX_LENGTH + 1).astype(np.int64)
    count[0] = 0
    first = np.zeros(MAX_LENGTH + 1, dtype=np.int64)
    code = 0
    for n in range(1, MAX_LENGTH + 1):
        code = (code + count[n - 1]) << 1 if n > 1 else 0
        first[n] = code
    return first, count, np.concatenate([order, np.zeros(1, dtype=np.int64)])


def huffman_decode(data: torch.Tensor, lengths: torch.Tensor, n: int, *, kernel: bool = True) -> torch.Tensor:
    """uint8 bytes -> int64 symbols [n]; kernel=False runs the pure-Python reference loop."""
    buf = np.ascontiguousarray(torch.as_tensor(data, dtype=torch.uint8).numpy())
    if n < 0:
        raise ValueError(f"huffman_decode: n must be >= 0, got {n}")
    if n > 8 * buf.size:  # every code takes a bit at least: refuse before sizing the output by n
        raise ValueError(f"Huffman stream of {buf.size} bytes cannot hold {n} symbols (truncated data)")
    first, count, symbols = decode_tables(lengths)
    if kernel:
        from .. import kernels

        out = kernels.huffman_decode(buf, first, count, symbols, n)
        if out is not None:
            return torch.from_numpy(out)
    return torch.from_numpy(_decode_reference(buf, first, count, symbols, n))


def _decode_reference(buf: np.ndarray, first, count, symbols, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.int64)
    bits = np.unpackbits(buf).tolist()
    first, count, symbols = first.tolist(), count.tolist(), symbols.tolist()
    pos, nbits = 0, len(bits)
    for i in range(n):
        code, index = 0, 0
        for length in range(1, MAX_LENGTH + 1):
            if pos >= nbits:
                raise ValueError(f"Huffman stream ends after {i} of {n} symbols (truncated data)")
            code = (code << 1) | bits[pos]
            pos += 1
            if code - first[length] < count[length]:
                out[i] = symbols[index + code - first[length]]
                break
            index += count[length]
        else:
            raise ValueError(f"invalid Huffman code at symbol {i} (corrupt data)")
    return out
