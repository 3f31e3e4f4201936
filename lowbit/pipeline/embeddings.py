"""The input embedding table and the output layer (lm_head): quantized by the recipe's `embeddings`
and `output` schemes, round to nearest (at the 6-8 bits they get, RTN is near lossless; llama.cpp
rounds them the same way).

Tied weights (lm_head.weight is embed_tokens.weight, as in SmolLM2) stay tied: one QTensor
[vocab, dim] serves the QuantEmbedding lookup and the QuantLinear head, and is stored and
counted once.
"""
from __future__ import annotations

from torch import nn

from ..core import Scheme
from ..methods import rtn
from ..nn import QuantEmbedding, QuantLinear
from .recipe import Recipe
from .walk import is_linear, set_module


def embedding_targets(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], tuple[str, nn.Module] | None]:
    """([(name, input embedding)], (name, output layer) or None). Transformers models name them
    (get_input_embeddings / get_output_embeddings); any other model: every nn.Embedding, no head."""
    names = {id(m): n for n, m in model.named_modules()}
    if hasattr(model, "get_input_embeddings"):
        emb = _call(model.get_input_embeddings)
        head = _call(getattr(model, "get_output_embeddings", lambda: None))
        inputs = [(names[id(emb)], emb)] if isinstance(emb, nn.Embedding) else []
        return inputs, ((names[id(head)], head) if head is not None and id(head) in names else None)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)], None


def _call(fn):
    try:
        return fn()
    except NotImplementedError:  # transformers' default for models without embeddings
        return None


def embedding_jobs(model: nn.Module, recipe: Recipe, taken: set[str] = frozenset(),
                   only: "set[str] | None" = None) -> list[tuple[list[str], nn.Module, Scheme]]:
    """[(names, the module whose weight is rounded, scheme)] for the embeddings and the output layer
    the recipe gives schemes for; a tied pair is one job naming both (the table first).
    `taken`: modules the recipe's Linear patterns already quantize (a clash is an error).
    `only`: leave alone the ones not named here (a part of the model being quantized)."""
    if recipe.embeddings is None and recipe.output is None:
        return []
    inputs, head = embedding_targets(model)
    if only is not None:
        inputs = [(n, e) for n, e in inputs if n in only]
        head = head if head is not None and head[0] in only else None
    clash = sorted(taken & {n for n, _ in inputs + ([head] if head else [])})
    if clash:
        raise ValueError(f"{clash[0]!r} is matched by the recipe's include patterns and is also its embedding "
                         "table or output layer: drop it from include, or set embeddings/output=None")
    if head is not None and recipe.output is not None and not is_linear(head[1]):
        raise ValueError(f"output layer {head[0]!r} is a {type(head[1]).__name__}, not a Linear: "
                         "set output=None in the recipe")
    tied = head is not None and any(head[1].weight is e.weight for _, e in inputs)
    jobs = []
    if tied:
        name, emb = next((n, e) for n, e in inputs if e.weight is head[1].weight)
        jobs.append(([name, head[0]], emb, _tied_scheme(recipe)))
        inputs = [(n, e) for n, e in inputs if n != name]
    elif head is not None and recipe.output is not None:
        jobs.append(([head[0]], head[1], recipe.output))
    if recipe.embeddings is not None:
        jobs += [([name], emb, recipe.embeddings) for name, emb in inputs]
    return jobs


def quantize_embeddings(model: nn.Module, recipe: Recipe, taken: set[str] = frozenset(),
                        only: "set[str] | None" = None, solve=None) -> list[str]:
    """Replace the embeddings and the output layer the recipe gives schemes for (embedding_jobs);
    -> names replaced. `solve(name, "rtn", scheme, {})`: may give a job's QTensor (None: round its
    weight here), as in pipeline.quantize."""
    done = []
    for names, module, scheme in embedding_jobs(model, recipe, taken, only):
        q = solve(names[0], "rtn", scheme, {}) if solve is not None else None
        q = q if q is not None else rtn(module.weight.detach().float(), scheme)
        for name in names:  # a tied pair: one QTensor serves the lookup and the head
            m = model.get_submodule(name)
            new = QuantEmbedding.from_embedding(m, q) if isinstance(m, nn.Embedding) else QuantLinear.from_linear(m, q)
            set_module(model, name, new)
        done += names
    return done


def _tied_scheme(recipe: Recipe):
    e, o = recipe.embeddings, recipe.output
    if e is not None and o is not None and e != o:
        raise ValueError(f"the embedding table and the output layer are tied (one tensor) but the recipe gives "
                         f"them different schemes (embeddings={e.format}/{e.granularity}, output={o.format}/"
                         f"{o.granularity}): give both the same scheme, or only one of them")
    return e or o
