"""Scheme: how a tensor is quantized (format, granularity, scales, range, rounding).

A Scheme is a small frozen value that round-trips through JSON. Composite
schemes used in practice have names in SCHEMES (mxfp4, nvfp4, nf4-dq, ...).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .. import formats
from .granularity import (KINDS, Granularity, PerGroup, PerTensor, granularity_name)

SCALE_FORMATS = ("fp32", "fp16", "bf16", "e8m0", "fp8_e4m3")
RANGES = ("absmax", "minmax", "percentile", "mse", "absmean")
ROUNDINGS = ("nearest", "stochastic")
KMEANS = formats.KMEANS_NAME
VERSION = 1
MAX_BITS = 8  # codes are packed into bytes (core/packing.py); wider formats serve as scale formats only


@dataclass(frozen=True)
class Scheme:
    format: str
    granularity: Granularity = field(default_factory=PerTensor)
    symmetric: bool = True
    scale_format: str = "fp32"
    range: str = "absmax"
    percentile: float = 99.9
    rounding: str = "nearest"
    double_quant: "Scheme | None" = None  # scheme for the scales themselves (QLoRA)
    tensor_scale: bool = False  # a second fp32 scale over the whole tensor (NVFP4)
    integer_zero: bool = False  # affine: zero point on the integer grid, 0.0 exact (GPTQ/AWQ style)
    name: str | None = None

    def __post_init__(self):
        if not KMEANS.fullmatch(self.format):
            formats.get(self.format)  # raises ValueError naming the format
            _check_width(self.format)
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale_format={self.scale_format!r}: choose one of {', '.join(SCALE_FORMATS)}")
        if self.range not in RANGES:
            raise ValueError(f"range={self.range!r}: choose one of {', '.join(RANGES)}")
        if self.symmetric and self.range == "minmax":
            raise ValueError("range='minmax' is the affine rule; use range='absmax' with symmetric=True, "
                             "or symmetric=False")
        if not self.symmetric and self.range in ("absmax", "absmean"):
            raise ValueError(f"range={self.range!r} is a symmetric rule; use range='minmax' with symmetric=False")
        if self.integer_zero and self.symmetric:
            raise ValueError("integer_zero applies to affine schemes: set symmetric=False or drop it")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding={self.rounding!r}: choose one of {', '.join(ROUNDINGS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile={self.percentile}: must be in (50, 100]")
        if not self.symmetric and not self.is_learned and self.fmt.kind != "int":
            raise ValueError(f"affine (symmetric=False) needs an integer format, got {self.format!r}; "
                             "use symmetric=True for float and codebook formats")
        if self.symmetric and not self.is_learned and not self.fmt.is_signed:
            raise ValueError(f"format {self.format!r} is unsigned: use symmetric=False (affine) with it")

    @property
    def is_learned(self) -> bool:
        return bool(KMEANS.fullmatch(self.format))

    @property
    def fmt(self) -> formats.Format:
        return formats.get(self.format)

    @property
    def bits(self) -> int:
        m = KMEANS.fullmatch(self.format)
        return int(m.group(1)) if m else self.fmt.bits

    def replace(self, **kw) -> "Scheme":
        return dataclasses.replace(self, **kw)

    # -- JSON ------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["granularity"] = {"kind": granularity_name(self.granularity), **dataclasses.asdict(self.granularity)}
        d["double_quant"] = self.double_quant.to_dict() if self.double_quant else None
        d["version"] = VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        d = dict(d)
        version = d.pop("version", VERSION)
        if version != VERSION:
            raise ValueError(f"scheme version {version} is not supported (this lowbit reads version {VERSION})")
        g = dict(d["granularity"])
        kind = g.pop("kind")
        if kind not in KINDS:
            raise ValueError(f"scheme granularity kind {kind!r} is unknown")
        d["granularity"] = KINDS[kind](**g)
        if d.get("double_quant"):
            d["double_quant"] = cls.from_dict(d["double_quant"])
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"scheme has unknown fields {sorted(unknown)}")
        return cls(**d)


def _check_width(name: str) -> None:
    bits = formats.get(name).bits
    if bits > MAX_BITS:
        use = (f"cast the model instead (model.{'half' if name == 'fp16' else 'bfloat16'}()), or "
               f"scale_format={name!r} for the scales" if name in ("fp16", "bf16")
               else "use a format of at most 8 bits (e.g. 'q3.4', 'int8')")
        raise ValueError(f"format {name!r} has {bits}-bit codes; a Scheme quantizes to codes of at most "
                         f"{MAX_BITS} bits: {use}")


# QLoRA's second level: the scales (after subtracting their mean) in the
# signed dynamic 8-bit map, 256 per block, each block with an fp32 absmax.
DQ_SCALES = Scheme("dynamic8", PerGroup(256), scale_format="fp32")

SCHEMES: dict[str, Scheme] = {
    # OCP Microscaling v1.0: 32 elements share a power-of-two (E8M0) scale.
    "mxfp4": Scheme("fp4_e2m1", PerGroup(32), scale_format="e8m0", name="mxfp4"),
    "mxfp6": Scheme("fp6_e2m3", PerGroup(32), scale_format="e8m0", name="mxfp6"),
    "mxfp6_e3m2": Scheme("fp6_e3m2", PerGroup(32), scale_format="e8m0", name="mxfp6_e3m2"),
    "mxfp8": Scheme("fp8_e4m3", PerGroup(32), scale_format="e8m0", name="mxfp8"),
    "mxint8": Scheme("int8", PerGroup(32), scale_format="e8m0", name="mxint8"),
    # NVIDIA NVFP4: 16-element blocks, fp8 E4M3 block scales under an fp32 tensor scale.
    "nvfp4": Scheme("fp4_e2m1", PerGroup(16), scale_format="fp8_e4m3", tensor_scale=True, name="nvfp4"),
    # QLoRA storage: NF4 in 64-blocks, absmax scales double-quantized.
    "nf4": Scheme("nf4", PerGroup(64), name="nf4"),
    "nf4-dq": Scheme("nf4", PerGroup(64), double_quant=DQ_SCALES, name="nf4-dq"),
}
