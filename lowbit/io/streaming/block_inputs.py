"""A block boundary's calibration inputs on disk, so that an interrupted calibrated job resumes there.

The sequential runner (pipeline/sequential.py) carries one thing from block i to block i + 1: the
block's inputs, per batch the hidden states and the other arguments captured at block 0 (position
ids, rotary cos/sin, masks), which every block gets unchanged. Each batch is one safetensors file:
the hidden states and every tensor among those arguments, their structure (tuples, None, numbers)
as JSON in the file's metadata beside the job's digest and the block's index, checked on reading.
The files are written in a temporary folder renamed whole, so a folder under its final name is
complete. Tensors come back bit for bit, with their dtypes: a resumed job computes the same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ...pipeline.blocks import BlockInput
from .. import atomic


class NotSaved(ValueError):
    """The inputs cannot be saved (an argument that is no tensor, tuple, list, number or None)."""


def save(folder: Path, inputs, *, digest: str, block: int) -> None:
    """Write `inputs` (BlockInputs: a list or a spill.Activations, read a batch at a time) to `folder`."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for b, inp in enumerate(inputs):
            tensors = {"hidden": inp.hidden.contiguous()}
            spec = _encode(inp.kwargs, "kw", tensors)
            # clones: safetensors refuses tensors sharing memory (cos/sin may be views of one table)
            save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(tmp / f"{b:05d}.safetensors"),
                      metadata={"digest": digest, "block": str(block), "kwargs": json.dumps(spec)})
        atomic.sync_tree(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def batches(folder: Path, *, digest: str, block: int) -> int:
    """How many batches `folder` holds, after checking that each file is whole and belongs to this
    job's `digest` and `block`; a ValueError naming the file otherwise."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files or [f.name for f in files] != [f"{b:05d}.safetensors" for b in range(len(files))]:
        raise ValueError(f"{folder} holds no complete set of block inputs")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                meta = h.metadata() or {}
        except Exception as e:  # safetensors' own error kinds for a truncated file
            raise ValueError(f"{f} is unreadable or truncated: {e}") from e
        if meta.get("digest") != digest or meta.get("block") != str(block):
            raise ValueError(f"{f} belongs to another job or block (block {meta.get('block')})")
    return len(files)


def load(folder: Path, into, n: int) -> None:
    """Append the `n` batches saved in `folder` to `into` (a list or a spill.Activations)."""
    from safetensors import safe_open

    for b in range(n):
        with safe_open(str(folder / f"{b:05d}.safetensors"), framework="pt") as h:
            spec = json.loads(h.metadata()["kwargs"])
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        into.append(BlockInput(tensors["hidden"], _decode(spec, tensors)))


def _encode(v, key: str, tensors: dict):
    if isinstance(v, torch.Tensor):
        tensors[key] = v
        return {"tensor": key}
    if isinstance(v, (tuple, list)):
        return {type(v).__name__: [_encode(x, f"{key}.{j}", tensors) for j, x in enumerate(v)]}
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise NotSaved(f"argument {key} has keys that are not strings")
        return {"dict": {k: _encode(x, f"{key}.{k}", tensors) for k, x in v.items()}}
    if v is None or isinstance(v, (bool, int, float, str)):
        return {"value": v}
    raise NotSaved(f"argument {key} is a {type(v).__name__}")


def _decode(spec: dict, tensors: dict):
    (kind, v), = spec.items()
    if kind == "tensor":
        return tensors[v]
    if kind in ("tuple", "list"):
        return {"tuple": tuple, "list": list}[kind](_decode(x, tensors) for x in v)
    if kind == "dict":
        return {k: _decode(x, tensors) for k, x in v.items()}
    return v
