"""KIVI (Liu et al., 2024): the KV cache with keys quantized per channel and values per token.

Keys have outlier channels that stay the same across tokens, so each channel (b, h, d) gets its
own scale and zero point over a group of G tokens; values have no such channels and are
quantized per token, in groups of G along the head dimension (G >= head_dim: one scale per token
and head). Integer formats are affine (KIVI's min/max rule); fp8 is symmetric (absmax).

Tensors here are token-major, [T, B, H, D], so that appending tokens appends bytes: a chunk's
packed codes follow the earlier codes, key statistics [B, H, D, T / G] grow along their last
axis and value statistics [T, B, H, ceil(D / G)] along their first. A key chunk must hold a
multiple of G tokens (a ragged group would split the statistics).

    >>> keys, values = kv_schemes("int4", group_size=64)
    >>> q = quantize(k.permute(2, 0, 1, 3), keys)     # k: [B, H, T, D] as transformers holds it
    >>> q = append_tokens(q, quantize(k_next.permute(2, 0, 1, 3), keys))
"""
from __future__ import annotations

import torch

from ..core import PerGroup, QTensor, Scheme

# name -> (format, symmetric). Integer codes are unsigned with a zero point (KIVI's asymmetric
# min/max quantization); fp8 is signed with a scale only.
KV_FORMATS = {"int8": ("uint8", False), "int4": ("uint4", False), "int2": ("uint2", False),
              "fp8": ("fp8_e4m3", True)}


def kv_schemes(name: str, *, group_size: int = 64, keys: str = "channel",
               scale_format: str = "fp16") -> tuple[Scheme, Scheme]:
    """(key scheme, value scheme) over token-major [T, B, H, D] tensors.

    keys="channel" (KIVI): groups of `group_size` tokens per channel; keys="token": like values,
    groups of `group_size` along the head dimension of each token."""
    if name not in KV_FORMATS:
        raise ValueError(f"KV cache format {name!r}: choose one of {', '.join(KV_FORMATS)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}: must be a positive int")
    if keys not in ("channel", "token"):
        raise ValueError(f"keys={keys!r}: choose 'channel' (KIVI, per channel over tokens) or 'token'")
    fmt, symmetric = KV_FORMATS[name]
    rng = "absmax" if symmetric else "minmax"

    def scheme(axis: int) -> Scheme:
        return Scheme(fmt, PerGroup(group_size, axis), symmetric=symmetric, range=rng, scale_format=scale_format)
    return (scheme(0) if keys == "channel" else scheme(-1)), scheme(-1)


def tokens_per_chunk(scheme: Scheme) -> int:
    """The multiple of tokens a chunk must hold: G for per-channel keys, 1 otherwise."""
    g = scheme.granularity
    return g.size if isinstance(g, PerGroup) and g.axis == 0 else 1


def append_tokens(old: QTensor | None, new: QTensor) -> QTensor:
    """Two token-major QTensors of one scheme -> one holding old's tokens then new's, by
    concatenating packed codes and statistics (nothing is re-quantized)."""
    if old is None:
        return new
    if old.scheme != new.scheme or old.shape[1:] != new.shape[1:]:
        raise ValueError(f"append_tokens: schemes or shapes differ ({old.shape} {old.scheme.name or ''} vs "
                         f"{new.shape} {new.scheme.name or ''})")
    step = tokens_per_chunk(old.scheme)
    if old.shape[0] % step:
        raise ValueError(f"append_tokens: {old.shape[0]} tokens end in a partial group of {step}; "
                         "append only whole groups")
    per_token_bits = new.numel // max(new.shape[0], 1) * new.scheme.bits
    if (old.shape[0] * per_token_bits) % 8:
        raise ValueError(f"append_tokens: {old.shape[0]} tokens of {per_token_bits} bits do not end on a byte")
    axis = -1 if step > 1 else 0  # per-channel key statistics grow along their last axis

    def cat(a, b):
        return None if a is None else torch.cat([a, b], dim=axis)
    return QTensor(torch.cat([old.codes, new.codes]), (old.shape[0] + new.shape[0],) + old.shape[1:], old.scheme,
                   scales=cat(old.scales, new.scales), zeros=cat(old.zeros, new.zeros))
