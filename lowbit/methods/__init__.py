"""L2: algorithms that choose quantized weights; one file each, one line each in METHODS.

A weight method maps (w: [out, in], scheme) to a QTensor; one that uses calibration
statistics says which in `fn.needs` (e.g. ("hessian",)) and takes them as `stats=`.
"""
from .gptq import gptq
from .hqq import hqq
from .rtn import mse_clip, rtn

METHODS = {
    "rtn": rtn,
    "mse": mse_clip,
    "hqq": hqq,
    "gptq": gptq,
}


def get_method(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "get_method", "rtn", "mse_clip", "hqq", "gptq"]
