"""Training in low precision (layer 3): one Adam with 32-bit or 8-bit block-wise state,
StableEmbedding, stochastic rounding for bf16 weights, compressed-gradient DDP hooks.

    from lowbit.optim import AdamW8bit
    keep_embeddings_32bit(model)  # optional: Trainer's recipe, 32-bit embedding state (see its doc)
    opt = AdamW8bit(model.parameters(), lr=1e-4)
"""
from .adam import Adam, Adam8bit, AdamW8bit, adam_math, state_nbytes
from .blockwise import BLOCK, dequantize_blockwise, quantize_blockwise, quantize_second_moment
from .comm_hooks import CompressionState, compressed_allreduce_hook
from .stable_embedding import StableEmbedding, keep_embeddings_32bit
from .stochastic import StochasticRounding

__all__ = ["Adam", "Adam8bit", "AdamW8bit", "adam_math", "state_nbytes", "BLOCK", "quantize_blockwise",
           "quantize_second_moment", "dequantize_blockwise", "StableEmbedding", "keep_embeddings_32bit", "StochasticRounding", "CompressionState",
           "compressed_allreduce_hook"]
