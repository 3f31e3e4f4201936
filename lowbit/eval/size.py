"""Exact storage size of a model, quantized modules included.

A module with `quantized_nbytes() -> int` (lowbit.nn.QuantLinear) is counted by that number (codes,
scales, zeros, bias); every other tensor counts numel x element size. Parameters and persistent
buffers are counted (what a state_dict would save); a tensor shared by two modules (tied
embeddings) is counted once, and so is a QTensor shared by a QuantEmbedding and a tied
QuantLinear head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn import QuantEmbedding


@dataclass(frozen=True)
class BitsFigure:
    """One of the two bits-per-weight figures lowbit reports, named the same in every table, JSON key and chart."""
    key: str    # JSON key (table.json, `lowbit memory --json`) and dataclass field
    label: str  # chart and HTML column label
    short: str  # text table column header
    means: str  # what is counted, in one sentence


# w8 on SmolLM2-135M: 8.05 over the quantized layers, 13.09 over the whole model (its fp32 embedding table)
BITS_LAYERS = BitsFigure("bits_per_weight_layers", "bits/w (quantized layers)", "bits/w layers",
                         "8 x bytes / weights of the blocks' quantized Linear layers (codes, scales, zero points); "
                         "the embedding table, output layer, norms and biases left out (linear_bits_per_weight)")
BITS_MODEL = BitsFigure("bits_per_weight_model", "bits/w (whole model)", "bits/w model",
                        "8 x bytes / parameters of the whole model, the embedding table, output layer (once when "
                        "tied), norms and every float tensor included (model_size)")


@dataclass(frozen=True)
class ModelSize:
    bytes: int              # total storage
    weights: int            # parameters the model represents (a QuantLinear: in x out + bias)
    bits_per_weight: float  # 8 * bytes / weights: BITS_MODEL
    embedding_bytes: int    # input embedding tables
    lm_head_bytes: int      # output head; 0 when tied to the input embedding
    lm_head_tied: bool
    quantized_modules: int  # modules counted through quantized_nbytes()


def _key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def _same_weight(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """One stored tensor behind both modules (a float Parameter or a QTensor)."""
    qa, qb = getattr(a, "qweight", None), getattr(b, "qweight", None)
    if qa is not None or qb is not None:
        return qa is qb
    return getattr(a, "weight", None) is not None and a.weight is getattr(b, "weight", None)


def _module_tensors(module: torch.nn.Module):
    """Direct parameters and buffers of one module (non-persistent ones too, e.g. RoPE tables:
    they are held in memory even though checkpoints do not store them)."""
    yield from (p for p in module.parameters(recurse=False))
    yield from (b for b in module.buffers(recurse=False) if b is not None)


def _quantized_weights(module: torch.nn.Module) -> int:
    bias = getattr(module, "bias", None)
    q = getattr(module, "qweight", None)
    if q is not None:
        n = q.numel
    elif hasattr(module, "in_features") and hasattr(module, "out_features"):
        n = module.in_features * module.out_features
    else:
        raise ValueError(f"model_size: {type(module).__name__} has quantized_nbytes() but no qweight or "
                         "in_features/out_features to count its weights by")
    return n + (bias.numel() if isinstance(bias, torch.Tensor) else 0)


def model_size(model: torch.nn.Module) -> ModelSize:
    """Bytes and bits per weight of `model` as it is held now.

    Example: model_size(fp32_model).bits_per_weight -> 32.0
    """
    seen, seen_q, total, weights, quantized = set(), set(), 0, 0, 0
    sizes = {}  # module -> bytes it alone adds (for the embedding / head split)
    for module in model.modules():
        nbytes = 0
        if hasattr(module, "quantized_nbytes"):
            nbytes, quantized = int(module.quantized_nbytes()), quantized + 1
            weights += _quantized_weights(module)
            q = getattr(module, "qweight", None)
            if q is not None and id(q) in seen_q:  # tied: the QTensor is counted with its first module
                nbytes -= q.nbytes
                weights -= q.numel
            elif q is not None:
                seen_q.add(id(q))
            seen.update(_key(t) for t in _module_tensors(module))
        for t in _module_tensors(module):
            if _key(t) in seen:
                continue
            seen.add(_key(t))
            nbytes += t.numel() * t.element_size()
            weights += t.numel() if isinstance(t, torch.nn.Parameter) else 0
        sizes[module] = nbytes
        total += nbytes
    embeddings = [m for m in model.modules() if isinstance(m, (torch.nn.Embedding, QuantEmbedding))]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and any(_same_weight(head, e) for e in embeddings)
    return ModelSize(bytes=total, weights=weights, bits_per_weight=8.0 * total / max(weights, 1),
                     embedding_bytes=sum(sizes[m] for m in embeddings) + (sizes[head] if tied else 0),
                     lm_head_bytes=0 if head is None or tied else sizes[head],
                     lm_head_tied=tied, quantized_modules=quantized)


def linear_bits_per_weight(model: torch.nn.Module) -> float:
    """BITS_LAYERS: bits per weight of the quantized layers inside the model (codes, scales, zeros), the
    embedding table and output layer left out (size() counts those); a model with none: the
    first Linear's dtype width (32.0 for fp32).

    Example: linear_bits_per_weight(quantize(model, "w4g64")) -> 4.5
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    qs = [m.qweight for m in model.modules()
          if hasattr(m, "quantized_nbytes") and not isinstance(m, QuantEmbedding) and m is not head]
    if qs:
        return 8.0 * sum(q.nbytes for q in qs) / sum(q.numel for q in qs)
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return 8.0 * ws[0].element_size() if ws else float("nan")
