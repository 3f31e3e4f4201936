"""L2: algorithms that choose quantized weights; one file each, one line each in a registry.

A solver (METHODS) maps (w: [out, in], scheme) to a QTensor; one that uses calibration
statistics says which in `fn.needs` (e.g. ("hessian",)) and takes them as `stats=`.
A transform (TRANSFORMS) maps (weights of the layers sharing an input, their input
statistics, scheme) to per-channel scales that the pipeline folds into the model.
A recipe's method chains them: "awq", "awq+gptq", "smoothquant", "smoothquant+gptq"
(transforms first, then at most one solver; round to nearest when none is named).
A whole-model transform (MODEL_TRANSFORMS: rotate) acts on the model once, before the block-by-block
calibration, and comes first in a chain: "rotate+awq+gptq", "rotate+gptq", "rotate" (then RTN).
A solver with `fn.block` (signround) trains a whole block's layers together: the pipeline runs it
block by block (pipeline/learned_rounding.py), `fn.needs` naming "block".
"""
import inspect
import json

from .awq import awq_scales
from .gptq import gptq
from .hqq import hqq
from .rotate import rotate_options
from .rtn import mse_clip, rtn
from .signround import signround
from .smoothquant import smoothquant_scales

METHODS = {
    "rtn": rtn,
    "mse": mse_clip,
    "hqq": hqq,
    "gptq": gptq,
    "signround": signround,
}


TRANSFORMS = {
    "awq": awq_scales,
    "smoothquant": smoothquant_scales,
}

# whole-model transforms: the pipeline applies them to the model before anything else (pipeline/rotate.py);
# the function checks their options
MODEL_TRANSFORMS = {
    "rotate": rotate_options,
}


def parse_method(name: str) -> tuple[tuple[str, ...], str]:
    """"awq+gptq" -> (("awq",), "gptq"); "smoothquant" -> (("smoothquant",), "rtn");
    "rotate+gptq" -> (("rotate",), "gptq") (whole-model transforms first: see block_transforms)."""
    parts = [p.strip() for p in str(name).split("+")]
    unknown = [p for p in parts if p not in METHODS and p not in TRANSFORMS and p not in MODEL_TRANSFORMS]
    if unknown or not parts:
        raise ValueError(f"unknown method {unknown[0] if unknown else name!r} in {name!r}; solvers: "
                         f"{', '.join(METHODS)}; transforms: {', '.join([*MODEL_TRANSFORMS, *TRANSFORMS])} "
                         "(chain with '+')")
    solvers = [p for p in parts if p in METHODS]
    transforms = tuple(p for p in parts if p not in METHODS)
    if len(solvers) > 1 or (solvers and parts[-1] != solvers[0]) or len(set(transforms)) < len(transforms):
        raise ValueError(f"method {name!r}: list transforms first, each once, then at most one solver")
    whole = [i for i, p in enumerate(parts) if p in MODEL_TRANSFORMS]
    if whole != list(range(len(whole))):
        raise ValueError(f"method {name!r}: {'/'.join(MODEL_TRANSFORMS)} acts on the whole model before the "
                         f"others: put it first ({'+'.join(['rotate', *[p for p in parts if p != 'rotate']])})")
    return transforms, solvers[0] if solvers else "rtn"


def block_transforms(transforms: tuple[str, ...]) -> tuple[str, ...]:
    """The transforms of a chain that run inside each block (TRANSFORMS), without the whole-model ones."""
    return tuple(t for t in transforms if t in TRANSFORMS)


def model_transforms(name: str) -> tuple[str, ...]:
    """The whole-model transforms of a method chain ("rotate+awq+gptq" -> ("rotate",))."""
    return tuple(t for t in parse_method(name)[0] if t in MODEL_TRANSFORMS)


def get_method(name: str):
    """The solver of a method name (validating the whole chain)."""
    return METHODS[parse_method(name)[1]]


def method_needs(name: str) -> set[str]:
    """The statistics a method chain uses ("hessian", "absmax", ...); empty for data-free ones."""
    transforms, solver = parse_method(name)
    fns = [TRANSFORMS[t] for t in block_transforms(transforms)] + [METHODS[solver]]
    return {k for f in fns for k in getattr(f, "needs", ())}


def check_method_options(options: dict) -> dict:
    """{method: {keyword: value}} -> the same, checked against each function's keyword-only
    parameters and JSON-representable (recipes are saved as JSON).

    Example: check_method_options({"gptq": {"damp": 0.05}, "smoothquant": {"alpha": 0.8}})"""
    if not isinstance(options, dict):
        raise ValueError(f"method_options must be a dict of {{method: {{option: value}}}}, got {options!r}")
    fns = {**METHODS, **TRANSFORMS, **MODEL_TRANSFORMS}
    out = {}
    for name, kw in options.items():
        if name not in fns:
            raise ValueError(f"method_options: unknown method {name!r}; known: {', '.join(fns)}")
        if not isinstance(kw, dict):
            raise ValueError(f"method_options[{name!r}] must be a dict of option: value, got {kw!r}")
        params = {p.name for p in inspect.signature(fns[name]).parameters.values() if p.kind is p.KEYWORD_ONLY}
        params.discard("stats")
        for k, v in kw.items():
            if k not in params:
                raise ValueError(f"method_options: {name} has no option {k!r}; its options: "
                                 f"{', '.join(sorted(params)) or 'none'}")
            try:
                json.dumps(v, allow_nan=False)
            except (TypeError, ValueError):
                raise ValueError(f"method_options: {name}.{k}={v!r} is not a JSON value") from None
        out[name] = dict(kw)
    return out


__all__ = ["METHODS", "TRANSFORMS", "MODEL_TRANSFORMS", "get_method", "parse_method", "block_transforms",
           "model_transforms", "method_needs", "check_method_options", "rtn", "mse_clip", "hqq",
           "gptq", "signround", "awq_scales", "smoothquant_scales"]
