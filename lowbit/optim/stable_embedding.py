"""StableEmbedding (Dettmers et al. 2022, section 2.3): an embedding that trains stably with
8-bit optimizers: Xavier uniform initialisation, a layer norm on its output, and 32-bit
optimizer state for its weight, whose rows see rare, sparse updates.

bitsandbytes asks for the 32-bit state through a global override manager; here the weight
carries `optim_bits = 32`, which lowbit.optim.Adam reads per parameter.
"""
from __future__ import annotations

import torch
from torch import nn


class StableEmbedding(nn.Embedding):
    """nn.Embedding + LayerNorm(embedding_dim), Xavier-initialised; ids [...] -> [..., embedding_dim]."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, **kwargs):
        super().__init__(num_embeddings, embedding_dim, padding_idx, **kwargs)
        self.norm = nn.LayerNorm(embedding_dim, device=self.weight.device)
        self.weight.optim_bits = 32

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb = super().forward(ids)
        # the norm runs in the default dtype, as bitsandbytes does, so fp16 weights stay stable
        return self.norm(emb.to(torch.get_default_dtype())).to(self.weight.dtype)


def keep_embeddings_32bit(model: nn.Module) -> int:
    """Give every nn.Embedding weight of `model` 32-bit optimizer state (`optim_bits = 32`), the recipe
    Hugging Face Trainer applies to bitsandbytes' 8-bit Adam, for a pretrained model whose embedding
    cannot become a StableEmbedding. A tied LM head shares the weight and so its state. Call before
    building the optimizer; returns the number of values marked (a shared weight counted once).

    lowbit's 8-bit state does not need it: on SmolLM2-135M all-8-bit state tracks AdamW too, since a
    positive second moment never rounds to 0 (blockwise.quantize_second_moment); before that rule
    the tied embedding's 8-bit state made fine-tuning diverge (docs/benchmarks.md, issue 12)."""
    marked = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.weight.optim_bits = 32
            marked[id(module.weight)] = module.weight.numel()
    return sum(marked.values())
