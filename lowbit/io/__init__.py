"""L5: reading and writing checkpoints (GGUF, safetensors); optional dependencies imported inside."""
from .builtin import builtin_model_path
from .gguf_read import read_gguf_tensors

__all__ = ["builtin_model_path", "read_gguf_tensors"]
