"""L5: reading and writing checkpoints (GGUF, safetensors); optional dependencies imported inside."""
from .api import load, save
from .builtin import builtin_model_path
from .gguf.read import read_gguf_tensors
from .lowbit_format import load_lowbit, save_lowbit
from .models import default_text, load_model, wikitext2

__all__ = ["builtin_model_path", "default_text", "load", "load_lowbit", "load_model", "read_gguf_tensors",
           "save", "save_lowbit", "wikitext2"]
