"""lowbit: neural-network quantization toolkit."""
from . import core, formats
from .core import QTensor, Scheme, error_stats, quantize_tensor

__version__ = "0.1.0"
__all__ = ["formats", "core", "QTensor", "Scheme", "quantize_tensor", "error_stats", "__version__"]
