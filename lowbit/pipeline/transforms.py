"""Equivalence transforms inside one block, between statistics and solving.

For every smoothing group (pipeline/mappings.py) the transform's method picks
per-channel scales s; the producer's output channels are divided by s and the
consumers' input columns multiplied by s, so the block computes the same
function (checked on a calibration batch: a norm that cannot absorb a scale,
e.g. Gemma's 1 + weight, is refused rather than silently changing the model).
The consumers' statistics are rescaled exactly (InputStats.scale_inputs), so
a solver that runs next (GPTQ) sees the transformed inputs. AWQ then clips
each layer's weights.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.phases import phase
from ..methods import TRANSFORMS
from ..methods.awq import awq_clip
from .blocks import BlockInput, run_block
from .mappings import SmoothGroup, smoothing_groups
from .walk import linear_weight

TOLERANCE = 1e-3  # relative change of the block's output allowed by a fold (float rounding)


@torch.no_grad()
def apply_transforms(block: nn.Module, names: list[str], transforms: dict[str, tuple[str, ...]], schemes: dict,
                     stats: dict, producers: dict[str, str | None], sample: BlockInput, where: str,
                     solvers: dict[str, str] | None = None, options: dict | None = None) -> None:
    """transforms: {layer name: transform names}; schemes: {layer name: weight Scheme};
    solvers: {layer name: solver}: AWQ clips the weights themselves unless GPTQ or learned rounding
    solves next (they must aim at the unclipped weights; GPTQ can clip its own grid instead, signround
    learns its clipping);
    options: {transform: keyword options} (Recipe.method_options)."""
    wanted = [n for n in names if transforms.get(n)]
    if not wanted:
        return
    fold_scales(block, wanted, transforms, schemes, stats, producers, sample, where, options)
    for n in wanted:
        if "awq" in transforms[n] and (solvers or {}).get(n) not in ("gptq", "signround"):
            w = linear_weight(block.get_submodule(n))
            with phase("awq clip"):
                w.copy_(awq_clip(w.float(), schemes[n], stats[n]).to(w.dtype))


@torch.no_grad()
def fold_scales(block: nn.Module, names: list[str], transforms: dict[str, tuple[str, ...]], schemes: dict,
                stats: dict, producers: dict[str, str | None], sample: BlockInput, where: str,
                options: dict | None = None) -> None:
    """Pick and fold every group's scales; the block's output must not change."""
    with phase("transform checks"):
        before = run_block(block, sample)
    for g in smoothing_groups(block, names, producers):
        st = stats[g.consumers[0]]
        for kind in transforms[g.consumers[0]]:
            ws = [linear_weight(block.get_submodule(c)).float() for c in g.consumers]
            own = [schemes[c] for c in g.consumers]
            # consumers under different schemes (mixed precision): each counted on its own grid
            sc = own[0] if all(x == own[0] for x in own) else own
            with phase(f"{kind} search"):
                s = TRANSFORMS[kind](ws, st, sc, **(options or {}).get(kind, {}))
            _fold(block, g, s)
            st.scale_inputs(s)
    with phase("transform checks"):
        after = run_block(block, sample)
    err = float((after - before).norm() / before.norm().clamp(min=1e-30))
    if not err < TOLERANCE:
        raise ValueError(f"folding smoothing scales into {where} changed its output by {err:.2e} (relative); "
                         "its norms or layer pairs cannot absorb scales exactly: use a method without "
                         f"{'/'.join(sorted(TRANSFORMS))} for this model")


def _fold(block: nn.Module, g: SmoothGroup, s: torch.Tensor) -> None:
    p = block.get_submodule(g.producer)
    if g.kind == "norm":
        p.weight.data /= s.to(p.weight.dtype)
    else:
        w = linear_weight(p)
        w /= s[:, None].to(w.dtype)
    if getattr(p, "bias", None) is not None:
        p.bias.data /= s.to(p.bias.dtype)
    for c in g.consumers:
        w = linear_weight(block.get_submodule(c))
        w *= s[None, :].to(w.dtype)
