"""Read tensors from a GGUF file as float32 torch tensors (dequantized by gguf-py).

A GGUF file is data from outside: any file, truncated, corrupt or with impossible sizes,
gives a ValueError naming the file (tests/test_io_fuzz.py), never another exception."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def read_gguf_tensors(path: str | Path, names=None) -> dict[str, torch.Tensor]:
    """{name: float32 tensor in PyTorch layout ([out, in] for weights)}; `names` filters by exact name."""
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError as e:  # optional dependency
        raise ValueError("reading GGUF needs the 'gguf' package: pip install 'lowbit[models]'") from e
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises several kinds on bad files
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    wanted = None if names is None else set(names)
    out = {}
    for t in reader.tensors:
        if wanted is not None and t.name not in wanted:
            continue
        try:
            arr = dequantize(t.data, t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest dimension first
            # a copy: the reader's arrays are read-only views of the memory-mapped file
            out[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
        except Exception as e:  # gguf-py and numpy raise several kinds on inconsistent tensors
            raise ValueError(f"{path}: tensor {t.name!r} is corrupt ({type(e).__name__}: {e})") from e
    if wanted is not None and wanted - set(out):
        raise ValueError(f"{path} has no tensor named {sorted(wanted - set(out))[0]!r}")
    return out
