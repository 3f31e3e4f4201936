"""Bit packing: exact round trips for every width, golden bytes, sizes."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.core import pack_bits_le, packed_nbytes, unpack_bits_le


@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_round_trip_every_width(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = pack_bits_le(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits_le(packed, bits, n), codes)


def slow_pack(codes, bits):
    """The obvious reference: one bit at a time into a little-endian stream."""
    out = bytearray(math.ceil(len(codes) * bits / 8))
    for i, c in enumerate(codes):
        for b in range(bits):
            if (c >> b) & 1:
                pos = i * bits + b
                out[pos // 8] |= 1 << (pos % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", range(1, 9))
def test_matches_bit_by_bit_reference(bits):
    codes = torch.randint(0, 2**bits, (77,), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    assert bytes(pack_bits_le(codes, bits).tolist()) == slow_pack(codes.tolist(), bits)


def test_golden_bytes():
    # 3-bit codes 1..7,0 -> stream 0x1F58D1 (LSB first); 4-bit codes 1, 2 -> 0x21
    assert pack_bits_le(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8), 3).tolist() == [0xD1, 0x58, 0x1F]
    assert pack_bits_le(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack_bits_le(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0x8D, 0x01]
    assert pack_bits_le(torch.tensor([63, 1], dtype=torch.uint8), 6).tolist() == [0x7F, 0x00]


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        pack_bits_le(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="uint8"):
        pack_bits_le(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="need 2"):
        unpack_bits_le(torch.zeros(3, dtype=torch.uint8), 4, 4)
