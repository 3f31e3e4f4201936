"""Recipes: which modules get which method and scheme.

A Recipe is a frozen dataclass that round-trips through JSON and is saved
beside the quantized model. Module names are matched with fnmatch patterns
(`include`, `exclude`); `overrides` change the method or schemes of the
modules a pattern matches, applied in order:

    Recipe(weights=Scheme("uint4", PerGroup(64), symmetric=False, range="minmax"), method="hqq",
           overrides=(Override("*down_proj", weights=Scheme("int8", PerChannel())),))

The input embedding table and the output layer (lm_head) are not Linear layers of the blocks:
`embeddings` and `output` give them their own schemes (round to nearest; None keeps them in
full precision). When the two are tied, one quantized tensor serves both:

    Recipe(weights=..., embeddings=Scheme("int8", PerChannel(0), scale_format="fp16"))
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..core import Scheme
from ..core.granularity import PerChannel, PerGroup, PerTensor, PerToken
from ..core.observers import OBSERVERS
from ..core.scheme import SCHEMES

VERSION = 1
DEFAULT_EXCLUDE = ("lm_head", "*embed*", "*pooler*")


@dataclass(frozen=True)
class Override:
    pattern: str
    method: str | None = None
    weights: Scheme | None = None
    activations: Scheme | None = None
    skip: bool = False


@dataclass(frozen=True)
class Recipe:
    weights: Scheme
    method: str = "rtn"
    activations: Scheme | None = None  # None: weight-only
    observer: str | None = None  # None: dynamic activations; else static, calibrated with this observer
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    overrides: tuple[Override, ...] = ()
    name: str | None = None
    outlier_threshold: float | None = None  # LLM.int8(): |x| >= this runs the column in full precision
    # keyword options of the methods in the chain, e.g. {"gptq": {"damp": 0.05}, "smoothquant": {"alpha": 0.8}}
    method_options: dict = dataclasses.field(default_factory=dict, hash=False)
    embeddings: Scheme | None = None  # input embedding table (rows looked up); None: full precision
    output: Scheme | None = None  # output layer (lm_head); tied to the embeddings: one tensor for both

    def __post_init__(self):
        from ..methods import check_method_options, get_method
        from ..methods.llm_int8 import check_threshold

        get_method(self.method)
        object.__setattr__(self, "method_options", check_method_options(self.method_options))
        if self.outlier_threshold is not None:
            check_threshold(self.outlier_threshold)
            if self.activations is None or self.observer is not None:
                raise ValueError("outlier_threshold (LLM.int8()) needs dynamic int8 activations per token: "
                                 "give activations=Scheme('int8', PerToken()) and no observer")
        if self.observer is not None and self.observer not in OBSERVERS:
            raise ValueError(f"observer={self.observer!r}: choose one of {', '.join(OBSERVERS)}")
        if self.observer is not None and self.activations is None:
            raise ValueError("an observer calibrates activations: give the recipe an activation scheme")
        if self.observer is not None and self.activations.fmt.kind != "int":
            raise ValueError(f"observer={self.observer!r} with {self.activations.format} activations: static "
                             "activation ranges are calibrated for integer activations only; fp8 activations "
                             "run dynamic, per token (the 'fp8-dynamic' recipe)")
        for o in self.overrides:
            if o.method:
                get_method(o.method)
        for which in ("embeddings", "output"):
            _check_row_scheme(which, getattr(self, which))

    def replace(self, **kw) -> "Recipe":
        return dataclasses.replace(self, **kw)

    def for_module(self, name: str) -> "Recipe | None":
        """The recipe that applies to module `name`, or None when it is left in full precision."""
        if not any(fnmatchcase(name, p) for p in self.include) or any(fnmatchcase(name, p) for p in self.exclude):
            return None
        r = self
        for o in self.overrides:
            if fnmatchcase(name, o.pattern):
                if o.skip:
                    return None
                r = r.replace(method=o.method or r.method, weights=o.weights or r.weights,
                              activations=o.activations or r.activations)
        return r

    # -- JSON --------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": VERSION, "name": self.name, "method": self.method, "observer": self.observer,
            "outlier_threshold": self.outlier_threshold, "method_options": self.method_options,
            "weights": self.weights.to_dict(),
            "activations": self.activations.to_dict() if self.activations else None,
            "embeddings": self.embeddings.to_dict() if self.embeddings else None,
            "output": self.output.to_dict() if self.output else None,
            "include": list(self.include), "exclude": list(self.exclude),
            "overrides": [{"pattern": o.pattern, "method": o.method, "skip": o.skip,
                           "weights": o.weights.to_dict() if o.weights else None,
                           "activations": o.activations.to_dict() if o.activations else None}
                          for o in self.overrides],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if d.get("version") != VERSION:
            raise ValueError(f"recipe version {d.get('version')!r} is not supported (this lowbit reads {VERSION})")

        def scheme(x):
            return Scheme.from_dict(x) if x else None

        overrides = tuple(Override(o["pattern"], o.get("method"), scheme(o.get("weights")),
                                   scheme(o.get("activations")), bool(o.get("skip"))) for o in d.get("overrides", []))
        return cls(weights=Scheme.from_dict(d["weights"]), method=d.get("method", "rtn"),
                   activations=scheme(d.get("activations")), observer=d.get("observer"),
                   include=tuple(d.get("include", ("*",))), exclude=tuple(d.get("exclude", DEFAULT_EXCLUDE)),
                   overrides=overrides, name=d.get("name"), outlier_threshold=d.get("outlier_threshold"),
                   method_options=d.get("method_options") or {}, embeddings=scheme(d.get("embeddings")),
                   output=scheme(d.get("output")))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))


def _check_row_scheme(field: str, s: Scheme | None) -> None:
    """Embedding tables are read a few rows at a time: each row needs its own scales."""
    g = getattr(s, "granularity", None)
    if s is None or isinstance(g, (PerTensor, PerToken)) or (isinstance(g, PerChannel) and g.axis in (0, -2)) \
            or (isinstance(g, PerGroup) and g.axis in (-1, 1)):
        return
    raise ValueError(f"{field}={s.format}/{g}: an embedding table [vocab, dim] needs scales per row: use "
                     "PerChannel(0), PerGroup(size) along the row (axis -1), or PerTensor()")


def _affine(fmt: str, group: int, integer_zero: bool = False) -> Scheme:
    return Scheme(fmt, PerGroup(group), symmetric=False, range="minmax", scale_format="fp16",
                  integer_zero=integer_zero)


# 4-bit recipes store integer zero points (0.0 exact, the GPTQ/AWQ checkpoint convention): on
# SmolLM2-135M w4g64 RTN gives +27.35% perplexity with them against +38.66% with float zeros, GPTQ
# +11.45% against +12.33% (docs/benchmarks.md). At 2-3 bits moving the range ends by up to half a
# step costs more (not measured on the model; worse on random weights): float zeros stay there.
# HQQ optimises a float zero point: see solver_scheme.
_INT_ZERO = True


def solver_scheme(weights: Scheme, solver: str) -> Scheme:
    """The weight scheme a named affine recipe uses with `solver`. HQQ optimises a float zero point
    (an integer one leaves it nothing to move) and groups along the output axis as the hqq library
    does: same bits per weight, measured better on SmolLM2 (docs/benchmarks.md). Others: unchanged."""
    if solver == "hqq" and not weights.symmetric and isinstance(weights.granularity, PerGroup):
        return weights.replace(integer_zero=False, granularity=PerGroup(weights.granularity.size, axis=0))
    return weights


_W8 = Scheme("int8", PerChannel(0), scale_format="fp32")
_A8_TOKEN = Scheme("int8", PerToken())
_A8_TENSOR = Scheme("int8", PerTensor())
# llm-compressor's FP8_DYNAMIC: fp8 weights per output channel, fp8 activations per token scaled at run time
_FP8_TOKEN = Scheme("fp8_e4m3", PerToken())

RECIPES: dict[str, Recipe] = {
    "w8": Recipe(_W8, name="w8"),
    "w4g128": Recipe(_affine("uint4", 128, _INT_ZERO), name="w4g128"),
    "w4g64": Recipe(_affine("uint4", 64, _INT_ZERO), name="w4g64"),
    "w4g32": Recipe(_affine("uint4", 32, _INT_ZERO), name="w4g32"),
    "w4g64-sym": Recipe(Scheme("int4", PerGroup(64), scale_format="fp16"), name="w4g64-sym"),
    "w3g64": Recipe(_affine("uint3", 64), name="w3g64"),
    "w2g64": Recipe(_affine("uint2", 64), name="w2g64"),
    "nf4": Recipe(SCHEMES["nf4"], name="nf4"),
    "nf4-dq": Recipe(SCHEMES["nf4-dq"], name="nf4-dq"),
    "fp8": Recipe(Scheme("fp8_e4m3", PerChannel(0)), name="fp8"),
    "fp8-tensor": Recipe(Scheme("fp8_e4m3", PerTensor()), name="fp8-tensor"),
    "fp8-dynamic": Recipe(Scheme("fp8_e4m3", PerChannel(0)), activations=_FP8_TOKEN, name="fp8-dynamic"),
    "mxfp4": Recipe(SCHEMES["mxfp4"], name="mxfp4"),
    "mxfp8": Recipe(SCHEMES["mxfp8"], name="mxfp8"),
    "nvfp4": Recipe(SCHEMES["nvfp4"], name="nvfp4"),
    "w8a8-dynamic": Recipe(_W8, activations=_A8_TOKEN, name="w8a8-dynamic"),
    "w8a8-static": Recipe(_W8, activations=_A8_TENSOR, observer="minmax", name="w8a8-static"),
    "llm-int8": Recipe(_W8, activations=_A8_TOKEN, outlier_threshold=6.0, name="llm-int8"),
    # extreme low bits, absmean scales: XNOR-Net's sign(W) * mean|W| per output channel, ternary
    # {-1, 0, 1} * mean|W| per channel, and BitNet b1.58 (per-tensor absmean ternary weights run with
    # int8 activations per token by nn.BitLinear)
    "binary": Recipe(Scheme("binary", PerChannel(0), range="absmean"), name="binary"),
    "ternary": Recipe(Scheme("ternary", PerChannel(0), range="absmean"), name="ternary"),
    "bitnet": Recipe(Scheme("ternary", PerTensor(), range="absmean"), activations=_A8_TOKEN, name="bitnet"),
}

# The integer weight recipes of 4 bits and fewer store the embedding table and the output layer
# too (one tensor when tied), in int8 groups of 32 with fp16 scales: llama.cpp's Q8_0 layout,
# 8.5 bits. Measured against fp32, int8 per row and int6: docs/benchmarks.md, "Embeddings and
# the output layer".
EMBEDDINGS_8BIT = Scheme("int8", PerGroup(32), scale_format="fp16")
for _name in ("w4g128", "w4g64", "w4g32", "w4g64-sym", "w3g64", "w2g64"):
    RECIPES[_name] = RECIPES[_name].replace(embeddings=EMBEDDINGS_8BIT, output=EMBEDDINGS_8BIT)


def get_recipe(name: "str | Recipe", method: str | None = None) -> Recipe:
    """A named recipe (see RECIPES), or a Recipe; `method` overrides its method ("auto": auto_method;
    "rotate+auto": rotate, then auto_method's chain).
    A named affine recipe with method "hqq" takes HQQ's float zero points and output-axis groups
    (solver_scheme)."""
    if isinstance(name, Recipe):
        r = name
    elif name in RECIPES:
        r = RECIPES[name]
    else:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)} (or build a lowbit.Recipe)")
    if method == "auto" or str(method).endswith("+auto"):  # "rotate+auto": the rotation, then auto's chain
        method = method.removesuffix("auto") + auto_method(r)
    if not method:
        return r
    r = r.replace(method=method)
    if isinstance(name, str):  # a named recipe adapts its scheme to the solver; a Recipe is taken as given
        from ..methods import parse_method
        r = r.replace(weights=solver_scheme(r.weights, parse_method(method)[1]))
    return r


def auto_method(r: Recipe) -> str:
    """The best chain measured for the recipe's kind (docs/benchmarks.md, reference protocol):
    W8A8 -> SmoothQuant (+0.61%); fp8 activations (fp8-dynamic) -> round to nearest (no chain measured);
    weights of 6 bits or fewer -> AWQ scales then GPTQ (w4g64 +5.86%, against GPTQ +13.2%, AWQ +11.3%,
    RTN +38.7%); 8-bit weights -> round to nearest
    (already +0.12%). All but the last need calibration data."""
    if r.activations is not None and r.activations.fmt.kind == "int":
        return "smoothquant"
    if r.activations is not None:  # fp8 activations: no calibrated chain measured for them
        return "rtn"
    return "awq+gptq" if r.weights.bits <= 6 else "rtn"
