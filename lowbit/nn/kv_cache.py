"""A quantized KV cache for transformers' decoders (KIVI-style; the math is methods/kivi.py).

Each attention layer keeps the most recent `residual_length` tokens in full precision and the
older ones as two packed QTensors (keys per channel, values per token), token-major [T, B, H, D].
When the residual window has grown by whole key groups, its oldest whole groups are quantized and
appended (codes and statistics concatenated, nothing re-quantized). Attention reads the
quantized part, then the residual window, then the tokens of the current step in full
precision: `update` returns them as PrefixKV tensors (nn/kv_attention.py), which any attention
sees as the whole dequantized [B, H, T, D] (as transformers' own QuantizedCache returns), and
which the "lowbit_kv" attention (`lowbit.nn.use_kv_attention(model)`) reads from the codes without
dequantizing the prefix.

    >>> cache = lowbit.kv_cache("int4", group_size=64, residual_length=128)
    >>> lowbit.nn.use_kv_attention(model)  # optional: attend from the codes (else: dequantize each step)
    >>> out = model.generate(ids, cache=cache, max_new_tokens=32)   # past_key_values= before 5.2x
    >>> cache.nbytes()          # exact bytes held: codes, scales, zero points, residual window

Built on transformers' Cache / DynamicLayer interface (transformers >= 5), so any decoder whose
attention calls `cache.update(k, v, layer_idx)` can use it; transformers 5.2x takes it as
`cache=`, earlier 5.x releases as `past_key_values=` (nn/cache.py's `cache_keyword` says which). transformers is an
optional dependency: this module imports it, `lowbit.kv_cache` imports this module when called.
"""
from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..core import QTensor, Scheme, quantize
from ..core.packing import pack_bits_le
from ..methods.kivi import append_tokens, kv_schemes, tokens_per_chunk
from .kv_attention import PrefixKV


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache: quantized keys/values (token-major QTensors) + a residual window."""

    is_croppable = False

    def __init__(self, key_scheme: Scheme, value_scheme: Scheme, residual_length: int = 128):
        super().__init__()
        self.key_scheme, self.value_scheme = key_scheme, value_scheme
        self.residual_length = residual_length
        self.qkeys: QTensor | None = None
        self.qvalues: QTensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append k, v: [B, H, t, D]; return every cached token's keys and values [B, H, T, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        # the prefix as it is before this step's flush, then the residual window and the new tokens
        keys, values = PrefixKV(self.qkeys, self.keys), PrefixKV(self.qvalues, self.values)
        self._flush()
        return keys, values

    def _flush(self) -> None:
        """Quantize the residual window's oldest whole key groups beyond `residual_length` tokens."""
        step = tokens_per_chunk(self.key_scheme)
        n = (self.keys.shape[-2] - self.residual_length) // step * step
        if n <= 0:
            return
        k, v = self.keys[..., :n, :].permute(2, 0, 1, 3), self.values[..., :n, :].permute(2, 0, 1, 3)
        self.qkeys = append_tokens(self.qkeys, quantize(k, self.key_scheme))
        self.qvalues = append_tokens(self.qvalues, quantize(v, self.value_scheme))
        self.keys, self.values = self.keys[..., n:, :].clone(), self.values[..., n:, :].clone()

    @property
    def quantized_length(self) -> int:
        return 0 if self.qkeys is None else self.qkeys.shape[0]

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.quantized_length + self.keys.shape[-2]

    def nbytes(self) -> int:
        """Exact bytes held: packed codes, scales and zero points, and the residual window."""
        if not self.is_initialized:
            return 0
        held = sum(q.nbytes for q in (self.qkeys, self.qvalues) if q is not None)
        return held + sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def reset(self) -> None:
        super().reset()
        self.qkeys = self.qvalues = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: select batch rows of the codes and statistics exactly (no re-quantization)."""
        if not self.is_initialized:
            return
        super().reorder_cache(beam_idx)
        self.qkeys = _select_batch(self.qkeys, beam_idx, stats_axis=0 if tokens_per_chunk(self.key_scheme) > 1 else 1)
        self.qvalues = _select_batch(self.qvalues, beam_idx, stats_axis=1)

    def batch_repeat_interleave(self, repeats: int) -> None:
        idx = torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats)
        self.reorder_cache(idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)


def _select_batch(q: QTensor | None, idx: torch.Tensor, stats_axis: int) -> QTensor | None:
    """Rows idx of the batch axis (1) of a token-major QTensor [T, B, H, D]."""
    if q is None:
        return None
    codes = q.unpack_codes().index_select(1, idx).contiguous()

    def pick(t):
        return None if t is None else t.index_select(stats_axis, idx)
    return QTensor(pack_bits_le(codes, q.scheme.bits), tuple(codes.shape), q.scheme,
                   scales=pick(q.scales), zeros=pick(q.zeros))


class QuantizedKVCache(Cache):
    """transformers Cache whose layers are QuantizedKVLayer; layers are made as the model asks."""

    def __init__(self, key_scheme: Scheme, value_scheme: Scheme, residual_length: int = 128):
        super().__init__(layer_class_to_replicate=partial(QuantizedKVLayer, key_scheme, value_scheme, residual_length))
        self.key_scheme, self.value_scheme, self.residual_length = key_scheme, value_scheme, residual_length

    def nbytes(self) -> int:
        """Exact bytes of every layer's cache (codes, scales, zero points, residual windows)."""
        return sum(layer.nbytes() for layer in self.layers)


def kv_cache(format: str = "int4", *, group_size: int = 64, residual_length: int = 128,
             keys: str = "channel", scale_format: str = "fp16") -> QuantizedKVCache:
    """A quantized KV cache for `model.generate(cache=...)` or a forward's `cache` (`past_key_values`
    before transformers 5.2x: `lowbit.nn.cache_keyword(model)` names it).

    format: "int8", "int4", "int2" (affine, KIVI's min/max) or "fp8" (e4m3, absmax); keys: "channel"
    (KIVI: per channel over groups of `group_size` tokens) or "token" (groups along the head dim);
    values are per token in groups of `group_size` along the head dim; the last `residual_length`
    tokens stay in full precision. Scales and zero points are stored in `scale_format`.

        >>> cache = kv_cache("int4"); model(ids, cache=cache, use_cache=True)
    """
    if not isinstance(residual_length, int) or residual_length < 0:
        raise ValueError(f"residual_length={residual_length!r}: must be an int >= 0 (tokens kept in full precision)")
    k, v = kv_schemes(format, group_size=group_size, keys=keys, scale_format=scale_format)
    return QuantizedKVCache(k, v, residual_length)
