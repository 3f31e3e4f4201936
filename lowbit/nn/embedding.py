"""QuantEmbedding: an nn.Embedding whose table is a QTensor.

A lookup dequantizes only the rows it needs (QTensor.rows): the table's scheme must give each
row its own codes and scales (per row, per tensor, or groups along the row), which is how
llama.cpp stores token embeddings too. The same QTensor can serve a tied output layer
(QuantLinear over the table [vocab, dim]): one tensor, stored and counted once. Casts and
moves behave as for QuantLinear (nn/base.py).
"""
from __future__ import annotations

import torch
from torch import nn

from ..core import QTensor
from .base import QuantModule


class QuantEmbedding(QuantModule):
    def __init__(self, qweight: QTensor, padding_idx: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not qweight.rows_are_independent():
            raise ValueError(f"QuantEmbedding: the table's scheme {qweight.scheme.format}/"
                             f"{qweight.scheme.granularity} does not give each row its own scales (shape "
                             f"{qweight.shape}); quantize embeddings per channel (axis 0), per tensor, or in groups "
                             "along the row (PerGroup(size), axis -1)")
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.qweight = qweight
        self.padding_idx = padding_idx
        self.dtype = dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, qweight: QTensor) -> "QuantEmbedding":
        if getattr(emb, "max_norm", None) is not None:
            raise ValueError("QuantEmbedding: embeddings with max_norm rewrite their table at lookup; "
                             "leave this one in full precision")
        return cls(qweight, getattr(emb, "padding_idx", None), dtype=emb.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [*] int64 -> [*, embedding_dim] in the table's original dtype."""
        rows = self.qweight.rows(ids.reshape(-1))
        return rows.dequantize(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def quantized_nbytes(self) -> int:
        """Exact bytes of the stored table (codes, scales, zeros)."""
        return self.qweight.nbytes

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table [num_embeddings, embedding_dim] (for code that reads .weight)."""
        return self.qweight.dequantize(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qweight!r}"
