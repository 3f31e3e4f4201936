"""Relative indices of a sparse tensor's kept entries, as Deep Compression stores them.

Positions p_0 < p_1 < ... (flattened, row-major) are written as gaps d_i = p_i - p_{i-1} with
p_{-1} = -1, each as a symbol of `gap_bits` bits. With M = 2^gap_bits - 1:

    symbol s < M    the next kept entry is s + 1 positions after the previous one
    symbol s = M    skip M positions, no entry here (a filler: for gaps longer than M)

The paper pads long gaps with a zero weight that also takes a cluster index; the filler symbol
here carries none, so a filler costs only its (Huffman-coded) gap symbol.

    symbols = relative_indices(torch.tensor([0, 2, 40]), gap_bits=3)   # [0, 1, 7, 7, 7, 7, 7, 2]
    absolute_positions(symbols, gap_bits=3)                          # [0, 2, 40]
"""
from __future__ import annotations

import torch


def _filler(gap_bits: int) -> int:
    if not 1 <= gap_bits <= 16:
        raise ValueError(f"gap_bits={gap_bits}: give 1..16 bits per relative index (the paper: 5 for fc layers)")
    return (1 << gap_bits) - 1


def relative_indices(positions: torch.Tensor, gap_bits: int) -> torch.Tensor:
    """positions: strictly increasing int [n] -> gap symbols int64 [n + fillers], each < 2^gap_bits."""
    M = _filler(gap_bits)
    p = positions.reshape(-1).long()
    r = torch.diff(p, prepend=torch.tensor([-1])) - 1  # zeros skipped before each kept entry
    if bool((r < 0).any()):
        raise ValueError("relative_indices needs strictly increasing positions")
    jumps, last = r // M, r % M
    ends = torch.cumsum(jumps + 1, 0) - 1  # where each entry's own symbol lands
    out = torch.full((int(ends[-1]) + 1 if p.numel() else 0,), M, dtype=torch.int64)
    out[ends] = last
    return out


def absolute_positions(symbols: torch.Tensor, gap_bits: int) -> torch.Tensor:
    """Gap symbols (relative_indices' output) -> the positions int64 [n] of the kept entries."""
    M = _filler(gap_bits)
    s = symbols.reshape(-1).long()
    if s.numel() and (int(s.min()) < 0 or int(s.max()) > M):
        raise ValueError(f"gap symbols must lie in 0..{M} for gap_bits={gap_bits}")
    step = torch.where(s == M, M, s + 1)
    pos = torch.cumsum(step, 0) - 1
    return pos[s != M]
