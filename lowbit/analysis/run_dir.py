"""What `lowbit compare --out RUN_DIR` leaves behind for `lowbit report RUN_DIR`.

    RUN_DIR/table.json        this module: {"model", "comparison": the Comparison (rows as dicts),
                              "memory": the MemoryTable of the model for the compared recipes}
    RUN_DIR/layers.json       per-layer analysis (lowbit.search / the per-layer tools): a list of
                              {"name", "recipe", "sqnr_db", "max_err", "clipped_share",
                               "output_rel_err", "sensitivity" (optional)}
    RUN_DIR/histograms/*.npz  one per layer: "values" (1-D sample of the weights), optional "grid"
                              (the quantization levels in the same units), optional "name" and
                              "recipe" (strings; default: the file's stem)

Every file is optional to the report except table.json; it says what is absent.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ..io.atomic import write_atomic
from .compare import Comparison
from .memory import MemoryTable

TABLE = "table.json"
LAYERS = "layers.json"
HISTOGRAMS = "histograms"
LAYER_KEYS = ("name", "recipe", "sqnr_db", "max_err", "clipped_share", "output_rel_err")


def _plain(x):
    """JSON-ready: dataclasses as dicts (properties of memory rows included), NaN as null."""
    if dataclasses.is_dataclass(x):
        d = {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        for prop in ("weights_bytes", "bits_per_weight_model", "total_bytes", "bytes_per_param"):
            if hasattr(type(x), prop):
                d[prop] = _plain(getattr(x, prop))
        return d
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def save_run(run_dir: "str | Path", model_name: str, cmp: Comparison, memory: MemoryTable | None = None) -> Path:
    """Write RUN_DIR/table.json (atomically); other files in RUN_DIR are left as they are. -> its path."""
    data = {"model": model_name, "comparison": _plain(cmp), "memory": _plain(memory) if memory else None}
    return write_atomic(Path(run_dir) / TABLE, json.dumps(data, indent=1, allow_nan=False))


def load_run(run_dir: "str | Path") -> dict:
    """{"table": table.json, "layers": list or None, "histograms": {stem: path}} of RUN_DIR."""
    run = Path(run_dir)
    table_path = run / TABLE
    if not table_path.is_file():
        raise ValueError(f"{run}: no {TABLE}; make one with `lowbit compare MODEL --out {run}`")
    table = _read_json(table_path)
    if not isinstance(table, dict) or not isinstance(table.get("comparison", {}).get("rows"), list):
        raise ValueError(f"{table_path}: expected {{'model', 'comparison': {{'rows': [...]}}, 'memory'}}")
    layers = None
    if (run / LAYERS).is_file():
        layers = _read_json(run / LAYERS)
        bad = next((x for x in layers if not isinstance(x, dict) or any(k not in x for k in LAYER_KEYS)), None) \
            if isinstance(layers, list) else layers
        if bad is not None:
            raise ValueError(f"{run / LAYERS}: each entry needs {', '.join(LAYER_KEYS)}; got {str(bad)[:120]}")
    hist = {p.stem: p for p in sorted((run / HISTOGRAMS).glob("*.npz"))} if (run / HISTOGRAMS).is_dir() else {}
    return {"table": table, "layers": layers, "histograms": hist}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
