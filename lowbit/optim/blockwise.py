"""Block-wise 8-bit optimizer state (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"): a flat state tensor cut into blocks of 2048 values, each block divided by its
absmax and rounded to the nearest value of a dynamic (tree) map.

The codes are kept padded to whole blocks (at most 2047 extra bytes per tensor) so every
operation runs over a [blocks, 2048] view at once; padding codes decode to 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import CodebookFormat, get

BLOCK = 2048


@dataclass(frozen=True)
class StateMap:
    """A dynamic map ready for fast rounding: the sorted values and the midpoints between them."""
    name: str
    values: torch.Tensor   # [256] float32, sorted
    mids: torch.Tensor     # [255] float32
    zero: int              # the code of 0.0 (padding)

    @classmethod
    def of(cls, name: str) -> "StateMap":
        fmt = get(name)
        if not isinstance(fmt, CodebookFormat) or fmt.bits != 8:
            raise ValueError(f"optimizer state map must be an 8-bit codebook format, got {name!r}")
        v = fmt.values.float()
        return cls(name, v, (v[1:] + v[:-1]) / 2, int(torch.argmin(v.abs())))


SIGNED = StateMap.of("dynamic8")             # first moment
UNSIGNED = StateMap.of("dynamic8_unsigned")  # second moment


def n_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def quantize_blockwise(x: torch.Tensor, qmap: StateMap) -> tuple[torch.Tensor, torch.Tensor]:
    """x: any shape, float32 -> (codes: [blocks * 2048] uint8, absmax: [blocks] float32).

    Each block is scaled by its absmax into [-1, 1] and rounded to the nearest map value
    (a tie goes to the larger value). An all-zero block keeps absmax 0 and decodes to 0.
    """
    flat = x.reshape(-1).float()
    nb = n_blocks(flat.numel())
    padded = torch.zeros(nb * BLOCK, dtype=torch.float32, device=x.device)
    padded[: flat.numel()] = flat
    blocks = padded.view(nb, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    codes = torch.bucketize(scaled, qmap.mids.to(x.device), right=True).to(torch.uint8)
    return codes.view(-1), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: StateMap, numel: int) -> torch.Tensor:
    """codes: [blocks * 2048] uint8, absmax: [blocks] -> [numel] float32."""
    vals = qmap.values.to(codes.device)[codes.long()].view(-1, BLOCK) * absmax[:, None]
    return vals.view(-1)[:numel]
