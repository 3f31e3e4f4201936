"""L6: analysis over quantized models: recipe comparison tables, the memory calculator, the format
explorer, and the HTML report of a compare run."""
from .compare import Comparison, CompareRow, compare_recipes, format_table, parse_specs
from .format_plot import FormatProfile, format_profile, plot_formats
from .memory import MemoryRow, MemoryTable, TrainingRow, format_memory, memory_table
from .report import pareto_front, write_report
from .run_dir import load_run, save_run

__all__ = ["Comparison", "CompareRow", "compare_recipes", "format_table", "parse_specs", "FormatProfile",
           "format_profile", "plot_formats", "MemoryRow", "MemoryTable", "TrainingRow", "format_memory",
           "memory_table", "pareto_front", "write_report", "load_run", "save_run"]
