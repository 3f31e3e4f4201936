"""Checkpoints larger than memory, quantized a part at a time and resumably: run (the driver),
source (the Hugging Face folder read), rows (a weight read a block of rows at a time), parts
(load / quantize / free one part), journal (shards, the journal a resume trusts, the finish),
calibrated (block by block with saved inputs), block_inputs, ray (the same work as Ray tasks)."""
from .run import quantize_checkpoint
from .source import streams

__all__ = ["quantize_checkpoint", "streams"]
