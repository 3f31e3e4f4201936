"""L6: analysis over quantized models: recipe comparison tables, the memory calculator, the format
explorer, per-layer errors and outliers, per-layer sensitivity, budgeted mixed precision (scipy,
imported where used), plots (matplotlib) and the HTML report of a compare run."""
from .compare import Comparison, CompareRow, compare_recipes, format_table, parse_specs
from .format_plot import FormatProfile, format_profile, plot_formats
from .layer_errors import LayerError, layer_errors, layer_report
from .memory import MemoryRow, MemoryTable, TrainingRow, format_memory, memory_table
from .mixed import DEFAULT_CANDIDATES, MixedPlan, plan_mixed, search, solve_budget
from .outliers import OutlierReport, collect_outliers, outlier_features
from .report import pareto_front, write_report
from .run_dir import load_run, save_run
from .sensitivity import Sensitivity, layer_sensitivity

__all__ = ["Comparison", "CompareRow", "compare_recipes", "format_table", "parse_specs", "FormatProfile",
           "format_profile", "plot_formats", "MemoryRow", "MemoryTable", "TrainingRow", "format_memory",
           "memory_table", "pareto_front", "write_report", "load_run", "save_run", "LayerError",
           "layer_errors", "layer_report", "DEFAULT_CANDIDATES", "MixedPlan", "plan_mixed", "search",
           "solve_budget", "OutlierReport", "collect_outliers", "outlier_features", "Sensitivity",
           "layer_sensitivity"]
