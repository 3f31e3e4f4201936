"""Base-3 packing of ternary codes, 5 trits per byte, in llama.cpp's TQ1_0 block layout.

A trit t in {0, 1, 2} (the ternary codebook's index: value t - 1). Five trits make a base-3
number v = t0*81 + t1*27 + t2*9 + t3*3 + t4 in 0..242, stored as the byte ceil(v * 256 / 243):
the fraction v / 243 in 8 bits, so trit k comes back as ((byte * 3^k mod 256) * 3) >> 8, a
multiply and a shift with no division (compilade's scheme in llama.cpp PR #8151).

Blocks of 256 trits (QK_K) take 52 bytes = 1.625 bits per trit, as TQ1_0's `qs[48]` + `qh[4]`:

    bytes  0..31   byte j holds trits j, j+32, j+64, j+96, j+128 (most significant first)
    bytes 32..47   byte j holds trits 160+j, 176+j, 192+j, 208+j, 224+j
    bytes 48..51   byte j holds trits 240+j, 244+j, 248+j, 252+j and a fifth trit 0

(TQ1_0 adds an fp16 scale per block; lowbit keeps its own scales beside the codes.) A tensor is
padded with trit 1 (value 0) to whole blocks.

    data = pack_trits_tq1(codes)               # uint8 [52 * ceil(n / 256)]
    assert torch.equal(unpack_trits_tq1(data, codes.numel()), codes)
"""
from __future__ import annotations

import torch

BLOCK = 256
BLOCK_BYTES = 52
_POW = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32)
# (first trit, trits per byte, bytes) of the three parts of a block
_PARTS = ((0, 5, 32), (160, 5, 16), (240, 4, 4))


def tq1_nbytes(n: int) -> int:
    return BLOCK_BYTES * (-(-n // BLOCK))


def pack_trits_tq1(codes: torch.Tensor) -> torch.Tensor:
    """codes: uint8 in {0, 1, 2}, any shape -> uint8 [52 * ceil(numel / 256)] (see the module doc)."""
    t = codes.reshape(-1)
    if t.numel() and int(t.max()) > 2:
        raise ValueError(f"pack_trits_tq1 packs ternary codes 0..2, got a code {int(t.max())}")
    t = torch.cat([t, t.new_ones(-t.numel() % BLOCK)]).to(torch.int32).reshape(-1, BLOCK)
    out = []
    for start, per, nb in _PARTS:
        part = t[:, start:start + per * nb].reshape(-1, per, nb)             # [blocks, k, byte j]
        v = (part * _POW[:per, None]).sum(1)                                  # the first `per` powers
        out.append(((v * 256 + 242) // 243).to(torch.uint8))
    return torch.cat(out, dim=1).reshape(-1)


def unpack_trits_tq1(data: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [52 * blocks] -> codes uint8 [n] in {0, 1, 2}."""
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != tq1_nbytes(n):
        raise ValueError(f"unpack_trits_tq1: {n} trits need {tq1_nbytes(n)} uint8 bytes, got {data.dtype} "
                         f"{tuple(data.shape)}")
    b = data.reshape(-1, BLOCK_BYTES).to(torch.int32)
    out, at = [], 0
    for _, per, nb in _PARTS:
        q = b[:, at:at + nb]
        mul = 3 ** torch.arange(per, dtype=torch.int32)                      # trit k: times 3^k, mod 256
        out.append((((q[:, None, :] * mul[None, :, None]) & 255) * 3 >> 8).reshape(b.shape[0], per * nb))
        at += nb
    return torch.cat(out, dim=1).reshape(-1)[:n].to(torch.uint8)
