"""L6: analysis over quantized models: recipe comparison tables (more to come: sensitivity, reports)."""
from .compare import Comparison, CompareRow, compare_recipes, format_table, parse_specs

__all__ = ["Comparison", "CompareRow", "compare_recipes", "format_table", "parse_specs"]
