"""L6: analysis over quantized models: recipe comparison tables (more to come: sensitivity, reports)."""
from .compare import CompareRow, compare_recipes, format_table

__all__ = ["CompareRow", "compare_recipes", "format_table"]
