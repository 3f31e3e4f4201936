"""Training in low precision (layer 3): one Adam with 32-bit or 8-bit block-wise state,
StableEmbedding, stochastic rounding for bf16 weights, compressed-gradient DDP hooks.

    from lowbit.optim import AdamW8bit
    opt = AdamW8bit(model.parameters(), lr=1e-4)
"""
from .adam import Adam, Adam8bit, AdamW8bit, adam_math, state_nbytes
from .blockwise import BLOCK, dequantize_blockwise, quantize_blockwise
from .comm_hooks import CompressionState, compressed_allreduce_hook
from .stable_embedding import StableEmbedding
from .stochastic import StochasticRounding

__all__ = ["Adam", "Adam8bit", "AdamW8bit", "adam_math", "state_nbytes", "BLOCK", "quantize_blockwise",
           "dequantize_blockwise", "StableEmbedding", "StochasticRounding", "CompressionState",
           "compressed_allreduce_hook"]
