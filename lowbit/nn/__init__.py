"""L3: modules that run quantized models (no math of their own)."""
from .linear import QuantLinear

__all__ = ["QuantLinear"]
