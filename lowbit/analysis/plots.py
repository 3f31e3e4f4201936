"""matplotlib without a display (Agg), and figures written atomically."""
from __future__ import annotations

from pathlib import Path

from ..io.atomic import write_atomic


def pyplot():
    """matplotlib.pyplot on the Agg backend (an optional dependency: pip install matplotlib)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError("plots need matplotlib: pip install 'lowbit[report]' (or matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def atomic_png(fig, path: "str | Path", dpi: int = 110) -> Path:
    """Save `fig` as PNG at `path` (temp file, then rename) and close it. -> the path."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return write_atomic(Path(path), buf.getvalue())
