"""Attention that reads lowbit's quantized KV cache as packed codes instead of dequantizing it.

QuantizedKVLayer.update returns keys and values as PrefixKV tensors: the quantized prefix (a
token-major QTensor, untouched) plus the full-precision tail (residual window and current
tokens). Any torch operation on a PrefixKV sees the whole [B, H, T, D] tensor, dequantized on the
spot (the old path: exact, but it dequantizes and copies the whole prefix at each step). The
attention function registered here as "lowbit_kv" recognises them instead and computes

    scores = q . K   from the codes (kernels/kv_attention.py: each code row dequantized in a
                     per-thread buffer, read once for every query head of its KV head)
             + q . K_tail in float32 torch,
    softmax with the causal / sliding-window / padding mask transformers made for sdpa,
    out    = p . V   from the codes + p_tail . V_tail,

in float32 whatever the model's dtype. It falls back to transformers' sdpa (over dequantized
K/V where needed, the old path) for: caches other than lowbit's, an empty quantized prefix,
more than MAX_QUERIES query tokens per step (chunked prefill: one dequantize per chunk is cheap
there), dropout, softcap, attention sinks, output_attentions, and codes the kernel does not read
(bits other than 2/4/8, head dims not filling whole bytes).

    >>> lowbit.nn.use_kv_attention(model)   # model.set_attn_implementation("lowbit_kv")
    >>> model.generate(ids, cache=lowbit.kv_cache("int4"), max_new_tokens=64)
"""
from __future__ import annotations

import functools

import torch
from torch.utils import _pytree as pytree
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..core import QTensor, Scheme
from ..kernels import kv_attention as kernel
from ..methods.kivi import tokens_per_chunk

NAME = "lowbit_kv"
MAX_QUERIES = 16  # query tokens per step read from codes; more (chunked prefill) dequantize once instead


class PrefixKV(torch.Tensor):
    """A cache layer's keys or values [B, H, T, D]: `prefix` (token-major QTensor [Tq, B, H, D] or
    None) followed by `tail` [B, H, Tt, D]. Torch operations see the concatenation (dequantized to
    `dtype` once per object, on first use); "lowbit_kv" attention reads prefix and tail directly."""

    @staticmethod
    def __new__(cls, prefix: QTensor | None, tail: torch.Tensor):
        out = tail.as_subclass(cls)
        out.prefix, out.tail, out._whole = prefix, tail, None
        return out

    def whole(self) -> torch.Tensor:
        if self._whole is None:
            parts = [] if self.prefix is None else [self.prefix.dequantize(self.tail.dtype).permute(1, 2, 0, 3)]
            self._whole = torch.cat([*parts, self.tail], dim=-2)
        return self._whole

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        args, kwargs = pytree.tree_map_only(cls, lambda x: x.whole(), (args, kwargs or {}))
        return func(*args, **kwargs)


def _whole(x):
    return x.whole() if isinstance(x, PrefixKV) else x


def _groups_along_d(q: QTensor) -> int:
    """J: groups along the head dim of a per-token QTensor (1 when one group spans it)."""
    return q.scale_values().shape[-1]


def _kernel_reads(q: QTensor) -> bool:
    bits, D = q.scheme.bits, q.shape[-1]
    if bits not in kernel.BITS or D % (8 // bits) or q.codebook is not None or q.offset is not None \
            or q.tensor_scale is not None:
        return False
    G = q.scheme.granularity.size
    return tokens_per_chunk(q.scheme) > 1 or _groups_along_d(q) == 1 or (D % G == 0 and G % (8 // bits) == 0)


def _lut(q: QTensor) -> torch.Tensor | None:
    return _decode_table(q.scheme)


@functools.cache
def _decode_table(scheme: Scheme) -> torch.Tensor | None:
    """What each code stands for; None where it is the integer itself (uintN: no table lookups)."""
    codes = torch.arange(2 ** scheme.bits, dtype=torch.uint8)
    lut = scheme.fmt.decode(codes).float()
    return None if torch.equal(lut, codes.float()) else lut


def _zeros(q: QTensor, s: torch.Tensor) -> torch.Tensor:
    z = q.zero_values()
    return torch.zeros_like(s) if z is None else z.float()


def prefix_scores(q: QTensor, query: torch.Tensor) -> torch.Tensor:
    """query [B, H, R, D] . keys [T, B, H, D] held as codes -> [B, H, R, T] (float32)."""
    T, D = q.shape[0], q.shape[-1]
    s = q.scale_values().float()
    z = _zeros(q, s)
    if tokens_per_chunk(q.scheme) > 1:  # per channel: s, z [B, H, D, T / G]
        a = query[:, :, None] * s.permute(0, 1, 3, 2)[:, :, :, None]           # q s: [B, H, T/G, R, D]
        qbias = (a * z.permute(0, 1, 3, 2)[:, :, :, None]).sum(-1)              # [B, H, T/G, R]
        return kernel.dots(q.codes, q.scheme.bits, _lut(q), a, s, s, qbias, q.scheme.granularity.size, True, T)
    J = s.shape[-1]  # per token: s, z [T, B, H, J]
    qsum = query.sum(-1, keepdim=True) if J == 1 else query.unflatten(-1, (J, D // J)).sum(-1)  # [B, H, R, J]
    return kernel.dots(q.codes, q.scheme.bits, _lut(q), query[:, :, None], s, s * z, qsum, 1, False, T)


def prefix_sums(q: QTensor, p: torch.Tensor) -> torch.Tensor:
    """weights p [B, H, R, T] . values [T, B, H, D] held as codes (per token) -> [B, H, R, D] (float32)."""
    s = q.scale_values().float()                                    # [T, B, H, J]
    return kernel.sums(q.codes, q.scheme.bits, _lut(q), p, s, _zeros(q, s))


def _mask_bias(mask: torch.Tensor | None, nq: int, T: int) -> torch.Tensor | None:
    """sdpa's mask (bool, True = attend; or additive float; None = causal) -> additive [B|1, 1, nq, T]."""
    if mask is None:
        if nq == 1:
            return None
        i = torch.arange(nq)[:, None] + (T - nq)
        mask = (torch.arange(T)[None, :] <= i)[None, None]
    mask = mask[..., -nq:, -T:]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    return mask.float()


def _unsupported(key, value, query, dropout, kwargs) -> bool:
    if not (isinstance(key, PrefixKV) and isinstance(value, PrefixKV)) or key.prefix is None:
        return True
    return (query.shape[2] > MAX_QUERIES or dropout or kwargs.get("softcap") is not None
            or kwargs.get("s_aux") is not None or kwargs.get("output_attentions")
            or tokens_per_chunk(value.prefix.scheme) > 1
            or not (_kernel_reads(key.prefix) and _kernel_reads(value.prefix)))


def quantized_kv_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """transformers attention function: query [B, Hq, nq, D], key/value [B, H, T, D] (PrefixKV
    from lowbit's cache) -> (output [B, nq, Hq, D], None)."""
    if _unsupported(key, value, query, dropout, kwargs):
        return sdpa_attention_forward(module, query, _whole(key), _whole(value), attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    B, Hq, nq, D = query.shape
    kt, vt = key.tail.float(), value.tail.float()
    H, Tq = kt.shape[1], key.prefix.shape[0]
    T = Tq + kt.shape[2]
    rep = Hq // H
    scaling = D ** -0.5 if scaling is None else scaling
    q = query.float().reshape(B, H, rep * nq, D)  # query heads h*rep .. h*rep+rep-1 read KV head h
    scores = torch.cat([prefix_scores(key.prefix, q), q @ kt.transpose(-1, -2)], dim=-1) * scaling
    bias = _mask_bias(attention_mask, nq, T)
    scores = scores.view(B, H, rep, nq, T)
    if bias is not None:
        scores = scores + bias.unsqueeze(1)
    p = torch.softmax(scores, dim=-1).view(B, H, rep * nq, T)
    out = prefix_sums(value.prefix, p[..., :Tq]) + p[..., Tq:] @ vt
    out = out.view(B, Hq, nq, D).transpose(1, 2).to(query.dtype)
    return out, None


def use_kv_attention(model) -> None:
    """Make `model` attend with "lowbit_kv": lowbit's quantized KV cache is then read from its
    codes; any other cache (or none) goes through transformers' sdpa as before. Registers the
    attention function (and sdpa's mask maker under the same name) with transformers first."""
    AttentionInterface.register(NAME, quantized_kv_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
