"""quantize_tensor: a float tensor -> QTensor, for every Scheme.

For each part [G, L] of the tensor's GroupView: choose the range (absmax,
minmax, percentile or MSE search), turn it into scales (and zero points) in
the scale format, then encode. Double quantization re-quantizes the scales
and encodes the values with the scales as they will be read back.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .. import formats, kernels
from . import scales as scale_store
from .granularity import GroupView, PerChannel, PerGroup, PerToken, make_granularity
from .grid import decode_part, encode_packed, encode_part
from .packing import pack_bits_le
from .qtensor import QTensor
from .ranges import MSE_RATIOS, full_range, percentile_range
from .scheme import SCHEMES, Scheme


def quantize_tensor(x: torch.Tensor, format: str | Scheme, *, granularity: str | None = None,
                    group_size: int | None = None, axis: int | None = None,
                    block: tuple[int, int] | None = None, symmetric: bool | None = None,
                    scale_format: str | None = None, range: str | None = None,
                    percentile: float | None = None, rounding: str | None = None,
                    generator: torch.Generator | None = None, seed: int = 0) -> QTensor:
    """Quantize x (any shape, float) to a QTensor.

    `format` is a format name ("int4", "fp8_e4m3", "nf4", "kmeans4", ...), a
    composite scheme name ("mxfp4", "nvfp4", "nf4-dq", ...) or a Scheme; the
    keywords override the scheme's fields. Weights w: [out, in] group along
    the last axis by default: scales then have shape [out, ceil(in / group)].

        >>> q = quantize_tensor(w, "int4", granularity="group", group_size=128)
        >>> w_hat = q.dequantize()
    """
    scheme = make_scheme(format, granularity=granularity, group_size=group_size, axis=axis, block=block,
                         symmetric=symmetric, scale_format=scale_format, range=range,
                         percentile=percentile, rounding=rounding)
    return quantize(x, scheme, generator=generator, seed=seed)


def make_scheme(format: str | Scheme, **overrides) -> Scheme:
    if isinstance(format, Scheme):
        base = format
    elif isinstance(format, str) and format in SCHEMES:
        base = SCHEMES[format]
    elif isinstance(format, str):
        if not formats.KMEANS_NAME.fullmatch(format):
            formats.get(format)  # a clear error for unknown names
        base = None
    else:
        raise ValueError(f"format must be a format or scheme name, or a Scheme; got {type(format).__name__}")
    kind = overrides.pop("granularity")
    gran_args = {k: overrides.pop(k) for k in ("group_size", "axis", "block")}
    fields = {k: v for k, v in overrides.items() if v is not None}
    if kind is not None or any(v is not None for v in gran_args.values()):
        if kind is None:
            kind = "group" if gran_args["group_size"] else "block" if gran_args["block"] else "channel"
        fields["granularity"] = make_granularity(kind, **gran_args)
    if "symmetric" in fields and "range" not in fields:
        fields["range"] = "absmax" if fields["symmetric"] else "minmax"
    if base is None:
        return Scheme(format, **fields)
    if fields:
        return base.replace(name=None, **fields)
    return base


def quantize(x: torch.Tensor, scheme: Scheme, *, generator: torch.Generator | None = None,
             seed: int = 0) -> QTensor:
    """Quantize x with a Scheme (see quantize_tensor)."""
    fused = _quantize_fused(x, scheme)  # the same QTensor in one pass, where the kernel applies
    if fused is not None:
        return fused
    x = _check_input(x)
    view = GroupView(tuple(x.shape), scheme.granularity)
    if x.numel() == 0:
        return _empty(view, scheme)
    if scheme.is_learned:
        return _quantize_learned(x, view, scheme, seed)
    # bf16/fp16 widen to float32 exactly, so they stay narrow here and are widened where used
    # (x / s computes in float32); float64 rounds to float32 first, as everything else does.
    parts = view.parts(x if x.dtype in (torch.bfloat16, torch.float16) else x.float())
    q = _fit_parts(x, view, parts, scheme)
    q.codes = _encode(view, parts, q, generator)
    return q


def quantize_with(x: torch.Tensor, params: QTensor, *, generator: torch.Generator | None = None) -> QTensor:
    """x encoded on the grid of `params` (a QTensor's scales, zero points and tensor scale, e.g.
    from fit_params, a solver, or learned scales): the same QTensor with x's codes. QAT re-rounds
    trained weights this way on fixed or learned scales.

        >>> q = quantize_with(w, fit_params(w, scheme))   # == quantize(w, scheme)
    """
    x = _check_input(x)
    if tuple(x.shape) != tuple(params.shape):
        raise ValueError(f"quantize_with: x has shape {tuple(x.shape)} but params were fitted for {params.shape}")
    if params.scheme.is_learned:
        raise ValueError(f"quantize_with: {params.scheme.format!r} learns a codebook per group; use quantize()")
    view = GroupView(tuple(x.shape), params.scheme.granularity)
    parts = view.parts(x if x.dtype in (torch.bfloat16, torch.float16) else x.float())
    return dataclasses.replace(params, codes=_encode(view, parts, params, generator))


def _encode(view: GroupView, parts: list[torch.Tensor], q: QTensor, generator) -> torch.Tensor:
    """Packed codes of the parts, encoded with the scales exactly as they will be read back."""
    scheme = q.scheme
    s_cols = view.split_stats(q.scale_values())
    z_cols = view.split_stats(q.zero_values()) if q.zeros is not None else [None] * len(parts)
    return encode_packed(view, parts, s_cols, z_cols, scheme.fmt, scheme.bits, scheme.rounding, generator)


def fit_params(x: torch.Tensor, scheme: Scheme) -> QTensor:
    """The scales, zero points and tensor scale quantize() would choose for x, as a QTensor
    without codes (read them back with scale_values() / zero_values()). Solvers such as GPTQ
    that pick codes themselves start from this."""
    x = _check_input(x)
    view = GroupView(tuple(x.shape), scheme.granularity)
    if scheme.is_learned:
        raise ValueError(f"{scheme.format!r} learns a codebook per group; it has no scales to fit")
    return _fit_parts(x, view, view.parts(x if x.dtype in (torch.bfloat16, torch.float16) else x.float()), scheme)


def _fit_parts(x: torch.Tensor, view: GroupView, parts: list[torch.Tensor], scheme: Scheme) -> QTensor:
    tensor_scale = _tensor_scale(x, scheme) if scheme.tensor_scale else None
    fitted = [_fit(p, scheme, scheme.fmt, tensor_scale) for p in parts]
    scales = view.merge_stats([f[0] for f in fitted])
    zeros = None if scheme.symmetric else scale_store.store(view.merge_stats([f[1] for f in fitted]),
                                                            scheme.scale_format)
    if scheme.double_quant is not None:
        scales = _double_quantize(scales, scheme)
    return QTensor(torch.empty(0, dtype=torch.uint8), tuple(x.shape), scheme, scales=scales, zeros=zeros,
                   tensor_scale=tensor_scale)


def _fit(part: torch.Tensor, scheme: Scheme, fmt, tensor_scale):
    """One part [G, L] -> (scales as stored [G], zero points [G] or None)."""
    if scheme.range not in ("absmax", "minmax"):
        part = part.float()
    if scheme.range == "mse":
        lo, hi = _mse_range(part, scheme, fmt, tensor_scale)
    elif scheme.range == "absmean":
        amax = part.abs().mean(dim=1, keepdim=True) * fmt.max
        lo, hi = -amax, amax
    elif scheme.range == "percentile":
        lo, hi = percentile_range(part, scheme.symmetric, scheme.percentile)
    else:
        lo, hi = (t.float() for t in full_range(part, scheme.symmetric))  # exact: min and max of part
    s, z = _params(lo, hi, scheme, fmt, tensor_scale)
    stored = scale_store.store(s / tensor_scale if tensor_scale is not None else s, scheme.scale_format)
    return stored.reshape(-1), (z.reshape(-1) if z is not None else None)


def _params(lo, hi, scheme: Scheme, fmt, tensor_scale):
    """Range [G, 1] -> effective float scale [G, 1] (as read back) and zero point or None."""
    if not scheme.symmetric:
        return scale_store.affine_params(lo, hi, fmt.min, fmt.max, scheme.scale_format, scheme.integer_zero)
    amax = torch.maximum(-lo, hi)
    if tensor_scale is not None:
        return scale_store.symmetric_scale(amax / tensor_scale, fmt.max, scheme.scale_format) * tensor_scale, None
    return scale_store.symmetric_scale(amax, fmt.max, scheme.scale_format), None


def _mse_range(part, scheme: Scheme, fmt, tensor_scale):
    """Per group, the shrink of the full range with the least squared error (1.0 included)."""
    lo0, hi0 = full_range(part, scheme.symmetric)
    best_err = torch.full_like(lo0, torch.inf)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for r in MSE_RATIOS:
        s, z = _params(lo0 * r, hi0 * r, scheme, fmt, tensor_scale)
        err = (decode_part(encode_part(part, s, z, fmt), s, z, fmt) - part).pow(2).sum(1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo0 * r, best_lo)
        best_hi = torch.where(better, hi0 * r, best_hi)
    return best_lo, best_hi


def _tensor_scale(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """NVFP4's fp32 tensor scale: maps the tensor's absmax onto fmt.max * scale_fmt.max."""
    amax = torch.maximum(-x.min(), x.max()).abs().float()  # max |x| without a temporary |x|
    top = scheme.fmt.max * formats.get(scheme.scale_format).max
    return torch.where(amax > 0, amax / top, torch.ones_like(amax))


def _double_quantize(stored_scales: torch.Tensor, scheme: Scheme) -> QTensor:
    """QLoRA: subtract the mean of the scales, quantize them with scheme.double_quant."""
    s = scale_store.load(stored_scales, scheme.scale_format)
    offset = s.mean()
    inner = quantize((s - offset).reshape(-1), scheme.double_quant)  # flat: blocks of 256 scales
    inner.offset = offset.reshape(())
    return inner


def _quantize_learned(x: torch.Tensor, view: GroupView, scheme: Scheme, seed: int) -> QTensor:
    """k-means codebook per group (or per tensor): codes are centroid indices."""
    k = 2**scheme.bits
    books, codes = [], []
    for p in view.parts(x.float()):
        c = formats.fit_centroids(p, k, seed=seed)
        c = scale_store.load(scale_store.store(c, scheme.scale_format), scheme.scale_format)
        books.append(c)
        codes.append(formats.kmeans_assign(p, c).to(torch.uint8))
    per_k = [view.merge_stats([b[:, j] for b in books]) for j in range(k)]
    codebook = scale_store.store(torch.stack(per_k, dim=-1), scheme.scale_format)
    packed = pack_bits_le(view.merge(codes).contiguous(), scheme.bits)
    return QTensor(packed, tuple(x.shape), scheme, codebook=codebook)


def _empty(view: GroupView, scheme: Scheme) -> QTensor:
    codes = torch.zeros(0, dtype=torch.uint8)
    if scheme.is_learned:
        return QTensor(codes, view.shape, scheme)
    return QTensor(codes, view.shape, scheme, scales=scale_store.store(torch.ones(view.stats_shape),
                                                                        scheme.scale_format))


def _quantize_fused(x, scheme: Scheme) -> QTensor | None:
    """kernels.quantize_rows for round-to-nearest absmax/minmax schemes whose groups are runs
    of a row (group along the last axis, channel along the first, token); None otherwise, or
    where the kernel declines (NaN/Inf input, other formats): then the code
    below runs and gives the same bits, or its error."""
    if (not isinstance(x, torch.Tensor) or x.dim() == 0 or scheme.is_learned or scheme.rounding != "nearest"
            or scheme.range not in ("absmax", "minmax") or scheme.tensor_scale or scheme.double_quant):
        return None
    g, shape, nd = scheme.granularity, tuple(x.shape), x.dim()
    if isinstance(g, PerGroup) and g.size >= 1 and g.axis in (-1, nd - 1):
        n, size = shape[-1], min(g.size, shape[-1])
    elif isinstance(g, PerChannel) and g.axis in (0, -nd):
        n = size = math.prod(shape[1:])
    elif isinstance(g, PerToken):
        n = size = shape[-1]
    else:
        return None
    out = kernels.quantize_rows(x, n, size, scheme.fmt, scheme.symmetric, scheme.scale_format, scheme.integer_zero)
    if out is None:
        return None
    codes, s, z = out  # scales and zero points as stored
    stats = GroupView(shape, g).stats_shape
    return QTensor(codes, shape, scheme, scales=s.reshape(stats), zeros=None if z is None else z.reshape(stats))


def _check_input(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"quantize_tensor needs a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"quantize_tensor needs a floating-point tensor, got dtype {x.dtype}")
    if x.numel() and not torch.isfinite(torch.stack([x.min(), x.max()])).all():  # min/max carry NaN
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise ValueError(f"tensor of shape {tuple(x.shape)} has {n_nan} NaN and {n_inf} Inf values; "
                         "quantization needs finite inputs (clean or mask them first)")
    return x
