"""The parts a streamed model is quantized in (the embeddings, each block, the rest): loading one
from the source shards, quantizing it with pipeline.quantize, and freeing it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .rows import StoredTensor
from .source import SourceTensors


@dataclass
class Part:
    """A piece of the model quantized and written as one: module names it covers."""
    name: str
    modules: list[str]


def quantized_modules(model: nn.Module, recipe) -> set[str]:
    """Names of the modules whose weight the recipe rounds or solves (pipeline.weight_plan; a tied
    table and output layer under the table's name)."""
    from ...pipeline.quantize import weight_plan

    return set(weight_plan(model, recipe))


def model_parts(model: nn.Module) -> list[Part]:
    """The embedding table with the output layer, then each repeated block, then the rest."""
    from ...pipeline.blocks import find_blocks
    from ...pipeline.embeddings import embedding_targets

    inputs, head = embedding_targets(model)
    first = [n for n, _ in inputs]
    tied = head is not None and any(head[1].weight is e.weight for _, e in inputs)
    if tied:
        first.append(head[0])  # one tensor: quantized once, stored once
    prefix, blocks = find_blocks(model)
    parts = [Part("embeddings", first)] + [Part(f"{prefix}.{i}", [f"{prefix}.{i}"]) for i in range(len(blocks))]
    if head is not None and not tied:  # its own part: the two largest tensors are never in memory together
        parts.append(Part("output", [head[0]]))
    covered = tuple(first) + (prefix,) + ((head[0],) if head else ())
    rest = [n for n, m in model.named_modules()
            if n and not under(n, covered) and any(True for _ in m.parameters(recurse=False))]
    return parts + ([Part("rest", rest)] if rest else [])


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def materialize(model: nn.Module, part: Part, where: SourceTensors, quantized: set[str] = frozenset(),
                 defer_bytes: int | None = None) -> "dict[str, StoredTensor]":
    """Load the part's tensors still on the meta device from the source shards (float32, as
    lowbit.load_model reads). The weights of `quantized` modules over `defer_bytes` in float32
    stay on meta (as float32): -> {module name: where its weight lies}, for row_solver."""
    from safetensors import safe_open

    from .rows import stored_tensors

    state = model.state_dict(keep_vars=True)
    keys = [k for k, v in state.items() if under(k.rpartition(".")[0], part.modules) and v.is_meta]
    tensors, deferred = {}, {}
    if defer_bytes is not None:
        for k in keys:
            module = k.rpartition(".")[0]
            if (k.endswith(".weight") and module in quantized and k in where and state[k].dim() == 2
                    and state[k].numel() * 4 > defer_bytes):
                deferred[module] = stored_tensors(where[k])[where.stored_name(k)]
                tensors[k] = torch.empty(state[k].shape, dtype=torch.float32, device="meta")
    for shard in sorted({where[k] for k in keys if k in where and k not in tensors}):
        try:
            with safe_open(str(shard), framework="pt") as f:
                for k in keys:
                    if where.get(k) == shard and k not in tensors:
                        t = f.get_tensor(where.stored_name(k))
                        tensors[k] = t.float() if t.is_floating_point() else t
        except Exception as e:  # safetensors' own error kinds, OSError: the file changed under the run
            raise ValueError(f"{shard} is unreadable or truncated (reading part {part.name}): {e}") from e
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in keys if k not in tensors and k not in tied]
    if missing:
        raise ValueError(f"the checkpoint has no tensor {missing[0]!r}, which the model's config needs")
    if not tensors:
        return deferred
    model.load_state_dict(tensors, strict=False, assign=True)
    if part.name == "embeddings" and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return deferred


def quantize_stored(t: StoredTensor, solver: str, scheme, options: dict, block_bytes: int):
    """The QTensor of the weight `t` on disk: read `block_bytes` of rows at a time for a row-wise
    solver, else read whole (a solver that needs the whole tensor). Also a Ray task's body."""
    from ...methods import METHODS
    from ...pipeline.rowwise import by_rows, quantize_by_rows

    if by_rows(solver, scheme, t.shape):
        return quantize_by_rows(t.read_rows, t.shape, solver, scheme, options, block_bytes=block_bytes)
    return METHODS[solver](t.read_rows(0, t.shape[0]).float(), scheme, **options)


def row_solver(deferred: "dict[str, StoredTensor]", block_bytes: int):
    """pipeline.quantize's `solve` for the deferred weights (quantize_stored)."""
    def solve(name, solver, scheme, options):
        t = deferred.get(name)
        return None if t is None else quantize_stored(t, solver, scheme, options, block_bytes)
    return solve


def quantize_part(model: nn.Module, recipe, part: Part, solve=None) -> None:
    from ...pipeline import quantize
    from ...pipeline.quantize import plan

    names = {n for n, _ in model.named_modules() if under(n, part.modules)}
    if set(plan(model, recipe, allow_empty=True)) & names or part.name in ("embeddings", "output"):
        quantize(model, recipe, modules=names, progress=False, solve=solve)


def release(model: nn.Module, part: Part) -> None:
    """Drop the part's memory: its modules become empty placeholders (the model never runs)."""
    from ...pipeline.walk import set_module

    for name in part.modules:
        set_module(model, name, nn.Identity())
