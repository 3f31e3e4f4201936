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


def quantize_blockwise(x: torch.Tensor, qmap: StateMap, *, keep_positive: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x: any shape, float32 -> (codes: [blocks * 2048] uint8, absmax: [blocks] float32).

    Each block is scaled by its absmax into [-1, 1] and rounded to the nearest map value
    (a tie goes to the larger value). An all-zero block keeps absmax 0 and decodes to 0.
    keep_positive: a value > 0 that would round to 0 takes the map's smallest positive level
    instead (Adam's second moment; see `quantize_second_moment`).
    """
    flat = x.reshape(-1).float()
    nb = n_blocks(flat.numel())
    padded = torch.zeros(nb * BLOCK, dtype=torch.float32, device=x.device)
    padded[: flat.numel()] = flat
    blocks = padded.view(nb, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    codes = torch.bucketize(scaled, qmap.mids.to(x.device), right=True)
    if keep_positive:
        codes = torch.where((blocks > 0) & (codes == qmap.zero), qmap.zero + 1, codes)
    return codes.to(torch.uint8).view(-1), absmax


def quantize_second_moment(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's second moment v (>= 0) on the unsigned map, never rounding a positive v to 0.

    v is the update's denominator, m / (sqrt(v) + eps): every other rounding error of the 8-bit
    state changes a step by a bounded factor (the map's relative spacing), but v rounded to 0
    while m is not multiplies it by up to sqrt(v) / eps. v spans the square of the gradients'
    range, so in a block whose absmax is set by a few large gradients (a tied embedding's rows of
    frequent tokens) the values under half the smallest level (1.6e-7 x absmax, gradients
    ~4e-4 x the block's largest) are common: SmolLM2-135M's full fine-tuning diverged from
    AdamW within 20 steps (docs/benchmarks.md, issue 12). Keeping such a v at the smallest
    positive level over-estimates it, so the step is at most the exact one (fp32 Adam's
    |update| <= lr |m_hat| / sqrt(v_hat)); values at or above half that level round to nearest
    as before, and the state stays codes + absmax on bitsandbytes' map, decoded unchanged.
    """
    return quantize_blockwise(v, UNSIGNED, keep_positive=True)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: StateMap, numel: int) -> torch.Tensor:
    """codes: [blocks * 2048] uint8, absmax: [blocks] -> [numel] float32."""
    vals = qmap.values.to(codes.device)[codes.long()].view(-1, BLOCK) * absmax[:, None]
    return vals.view(-1)[:numel]
