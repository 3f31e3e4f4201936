"""Finding a model's repeated blocks and capturing what flows into the first one.

The blocks are the longest nn.ModuleList of same-typed children that hold
Linear layers (Llama/Qwen2 `model.layers`, GPT-2 `transformer.h`, BERT
`encoder.layer`): no per-architecture code. Inputs are captured with a
pre-hook on block 0 that stops the forward there, so the embedding and
whatever the model computes before its blocks (rotary tables, masks) run
once, unchanged, and are handed to every block as the same keyword arguments.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .walk import is_linear


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the model's repeated blocks, or a clear error."""
    best, outer = None, []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2:
            continue
        if len({type(c) for c in m}) != 1 or not any(is_linear(x) for x in m[0].modules()):
            continue
        if any(name.startswith(o + ".") for o in outer):  # a block's own list (its experts), not the blocks
            continue
        outer.append(name)
        if best is None or len(m) > len(best[1]):
            best = (name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks holding Linear layers "
                         "(like model.layers or transformer.h); sequential calibration cannot run on it. "
                         "Use a data-free method (rtn, mse, hqq) for this model.")
    return best


class _Stop(Exception):
    pass


@dataclass
class BlockInput:
    """One calibration batch as block i sees it: hidden states plus the other arguments."""
    hidden: torch.Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)


def _call_model(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif getattr(model, "config", None) is not None:  # transformers: no KV cache to fill
        model(batch, use_cache=False)
    else:
        model(batch)


@torch.no_grad()
def capture_inputs(model: nn.Module, first_block: nn.Module, batches: list, into=None) -> list[BlockInput]:
    """Run each batch up to the first block and keep that block's inputs (appended to `into`, a
    list or a spill.Activations, when given)."""
    captured = [] if into is None else into

    def grab(module, args, kwargs):
        # name every argument, so each block can be called as block(hidden, **rest)
        sig = inspect.signature(module.forward)
        bound = sig.bind(*args, **kwargs).arguments
        hidden = bound.pop(next(iter(bound)))
        rest = {}
        for k, v in bound.items():
            if sig.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
                rest.update(v)  # **kwargs binds as one dict
            elif sig.parameters[k].kind is inspect.Parameter.VAR_POSITIONAL:
                raise ValueError(f"{type(module).__name__}.forward takes *args; the sequential runner "
                                 "calls blocks as block(hidden, **kwargs)")
            else:
                rest[k] = v
        rest.pop("use_cache", None)
        captured.append(BlockInput(hidden.detach(), rest))
        raise _Stop

    hook = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in batches:
            try:
                _call_model(model, b)
            except _Stop:
                pass
    finally:
        hook.remove()
    if len(captured) != len(batches):
        raise ValueError("the model did not reach its first block on every calibration batch")
    return captured


def block_forward(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    """block(hidden, **kwargs)'s hidden-state output, with autograd as the caller has it."""
    out = block(inp.hidden, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    return block_forward(block, inp)


def first_windows(inp: BlockInput, n: int = 1) -> BlockInput:
    """The first n windows of a batch [B, T, ...] with the arguments that go with them: every tensor of 2 or
    more dimensions whose first is B is cut to n (a mask [B, 1, T, T], position ids [B, T]); shared ones
    ([1, T, d] rotary tables) stay. When B is ambiguous (B == T), the whole batch."""
    h = inp.hidden
    B = h.shape[0]
    if h.dim() < 2 or B <= n or h.shape[1] == B:
        return inp

    def cut(v):
        if isinstance(v, torch.Tensor):
            return v[:n] if v.dim() >= 2 and v.shape[0] == B else v
        if isinstance(v, (tuple, list)):
            return type(v)(cut(x) for x in v)
        return v
    return BlockInput(h[:n], {k: cut(v) for k, v in inp.kwargs.items()})


def short_batch(batch, tokens: int = 64):
    """The first `tokens` positions of a calibration batch's first window: a [B, T] tensor, or a dict of
    them (input_ids, attention_mask, ...) -> [1, tokens]; None for any other kind of batch."""
    def cut(v):
        return v[:1, :tokens] if isinstance(v, torch.Tensor) and v.dim() == 2 else None
    if isinstance(batch, dict):
        out = {k: cut(v) for k, v in batch.items()}
        return None if any(v is None for v in out.values()) else out
    return cut(batch)
