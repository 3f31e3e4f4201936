"""Dense bit packing of 1..8-bit codes, least significant bits first.

Code i occupies bits [i*b, (i+1)*b) of the little-endian bit stream, so N
codes of b bits take exactly ceil(N*b/8) bytes for every width, 3, 5 and 6
included. Widths that divide 8 pack within a byte; the others pack 8 codes
into b bytes through a 64-bit word.
"""
from __future__ import annotations

import math
import sys

import torch

_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # codes per byte -> word of that many bytes


def packed_nbytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def pack_bits_le(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 of any shape, each < 2^bits -> flat uint8 [ceil(N*bits/8)]."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        raise ValueError(f"pack_bits_le needs uint8 codes, got {flat.dtype}")
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:
        per = 8 // bits
        if n % per == 0 and sys.byteorder == "little" and flat.is_contiguous() and flat.storage_offset() % per == 0:
            # Read each run of `per` codes as one little-endian word (code j in byte j) and
            # shift code j down to bit j*bits; the low byte of the OR is the packed byte.
            # Contiguous word ops are much faster than strided byte ops.
            words = flat.view(_WORDS[per])
            acc = words.clone()
            for j in range(1, per):
                acc |= words >> (j * (8 - bits))
            return acc.to(torch.uint8)  # keeps the low byte
        padded = _pad(flat, per).view(-1, per)
        out = padded[:, 0].clone()
        for j in range(1, per):
            out |= padded[:, j] << (bits * j)
        return out
    words = _pad(flat, 8).view(-1, 8).to(torch.int64)
    acc = words[:, 0].clone()
    for j in range(1, 8):
        acc |= words[:, j] << (bits * j)
    out = torch.stack([(acc >> (8 * k)) & 0xFF for k in range(bits)], dim=1).to(torch.uint8)
    return out.reshape(-1)[: packed_nbytes(n, bits)]


def unpack_bits_le(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits_le: flat uint8 -> uint8 [n]."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"unpack_bits_le needs a flat uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"packed data has {packed.numel()} bytes; {n} codes of {bits} bits need "
                         f"{packed_nbytes(n, bits)}")
    mask = (1 << bits) - 1
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:n]
    nb = _pad(packed, bits).view(-1, bits).to(torch.int64)
    acc = nb[:, 0].clone()
    for k in range(1, bits):
        acc |= nb[:, k] << (8 * k)
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64)
    return ((acc.unsqueeze(1) >> shifts) & mask).to(torch.uint8).reshape(-1)[:n]


def _pad(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -flat.numel() % multiple
    if extra == 0:
        return flat
    return torch.cat([flat, flat.new_zeros(extra)])


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
