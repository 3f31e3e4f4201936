"""lowbit.json and the tensors beside it are data from a file: check every field before use.

Each check raises ValueError naming the file and the field (`modules['fc1'].dtype`), so a
corrupt or hostile checkpoint never reaches getattr(torch, ...), an arbitrary class, or a
shape error deep in dequantize.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import formats
from ..core import Scheme
from ..core.granularity import GroupView, PerBlock, PerChannel, PerGroup

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FLOAT_SCALES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def field(where: Path | str, name: str, value, kind: type | tuple, allow_none: bool = False):
    """`value` if it is of `kind` (bool is not an int here), else a ValueError naming the field."""
    ok = (value is None and allow_none) or (isinstance(value, kind) and not (
        isinstance(value, bool) and kind in (int, float, (int, float))))
    if not ok:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field {name} must be {want}{' or null' if allow_none else ''}, "
                         f"got {type(value).__name__} {str(value)[:60]!r}")
    return value


def scheme(where, name: str, d) -> Scheme:
    """Scheme.from_dict with every type error turned into a ValueError naming the field."""
    field(where, name, d, dict)
    try:
        s = Scheme.from_dict(d)
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: field {name} is not a valid scheme: {e}") from e
    g = s.granularity
    ints = {PerGroup: ("size", "axis"), PerChannel: ("axis",), PerBlock: ("rows", "cols")}.get(type(g), ())
    for attr in ints:
        v = getattr(g, attr)
        if not isinstance(v, int) or isinstance(v, bool) or (attr != "axis" and v < 1):
            raise ValueError(f"{where}: field {name}.granularity.{attr} must be a positive integer, got {v!r}")
    if s.double_quant is not None:
        scheme(where, f"{name}.double_quant", d["double_quant"])
    return s


def shape(where, name: str, v) -> tuple[int, ...]:
    field(where, name, v, list)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v):
        raise ValueError(f"{where}: field {name} must be a list of non-negative integers, got {str(v)[:60]}")
    return tuple(v)


def dtype(where, name: str, v) -> torch.dtype:
    if not isinstance(v, str) or v not in DTYPES:
        raise ValueError(f"{where}: field {name} is {str(v)[:40]!r}; a lowbit checkpoint holds one of "
                         f"{', '.join(DTYPES)}")
    return DTYPES[v]


def model_class(where, name: str):
    """The transformers class called `name`, only if it is a PreTrainedModel subclass."""
    import transformers

    field(where, "model.class", name, str)
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{where}: field model.class {name[:60]!r} is not a transformers model class "
                         "(a PreTrainedModel subclass)")
    return cls


def tensor(where, key: str, t: torch.Tensor, shape_: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    if tuple(t.shape) != tuple(shape_) or t.dtype not in dtypes:
        want = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{where}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')} "
                         f"{list(t.shape)}, expected {want} {list(shape_)}")


def qtensor_parts(where, prefix: str, q) -> None:
    """Dtypes and shapes of a QTensor's parts against its scheme and shape."""
    s = q.scheme
    try:
        stats = GroupView(q.shape, s.granularity).stats_shape
    except ValueError as e:
        raise ValueError(f"{where}: {prefix}: {e}") from e
    tensor(where, f"{prefix}.codes", q.codes, (-(-q.numel * s.bits // 8),), (torch.uint8,))
    if q.codebook is not None:
        tensor(where, f"{prefix}.codebook", q.codebook, (*stats, 2 ** s.bits), (torch.float32, torch.float16))
    scale_dtype = _FLOAT_SCALES.get(s.scale_format) or formats.get(s.scale_format).encode(torch.ones(1)).dtype
    if isinstance(q.scales, torch.Tensor):
        tensor(where, f"{prefix}.scales", q.scales, stats, (scale_dtype,))
    elif q.scales is not None and q.scales.numel != math.prod(stats):
        raise ValueError(f"{where}: {prefix}.scales holds {q.scales.numel} values, expected {math.prod(stats)}")
    if q.zeros is not None:
        tensor(where, f"{prefix}.zeros", q.zeros, stats, (scale_dtype,))
    for part in ("tensor_scale", "offset"):
        t = getattr(q, part)
        if t is not None:
            tensor(where, f"{prefix}.{part}", t, tuple(t.shape) if t.numel() == 1 else (), (torch.float32,))
