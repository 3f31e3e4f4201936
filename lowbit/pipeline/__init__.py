"""L4: walking a model: recipes, module selection, calibration, quantization."""
from .quantize import plan, quantize
from .recipe import RECIPES, Override, Recipe, get_recipe

__all__ = ["quantize", "plan", "Recipe", "Override", "RECIPES", "get_recipe"]
