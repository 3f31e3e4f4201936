"""L6: analysis over quantized models: recipe comparison tables, per-layer errors and outliers,
per-layer sensitivity, budgeted mixed precision (scipy, imported where used), plots (matplotlib)."""
from .compare import Comparison, CompareRow, compare_recipes, format_table, parse_specs
from .layer_errors import LayerError, layer_errors, layer_report
from .mixed import DEFAULT_CANDIDATES, MixedPlan, plan_mixed, search, solve_budget
from .outliers import OutlierReport, collect_outliers, outlier_features
from .sensitivity import Sensitivity, layer_sensitivity

__all__ = ["Comparison", "CompareRow", "compare_recipes", "format_table", "parse_specs", "LayerError",
           "layer_errors", "layer_report", "DEFAULT_CANDIDATES", "MixedPlan", "plan_mixed", "search",
           "solve_budget", "OutlierReport", "collect_outliers", "outlier_features", "Sensitivity",
           "layer_sensitivity"]
