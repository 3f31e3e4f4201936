"""L4: walking a model: recipes, module selection, calibration, quantization."""
from .deep_compression import deep_compress
from .quantize import plan, quantize
from .recipe import RECIPES, Override, Recipe, get_recipe

__all__ = ["quantize", "plan", "deep_compress", "Recipe", "Override", "RECIPES", "get_recipe"]
