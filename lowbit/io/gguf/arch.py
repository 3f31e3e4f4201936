"""What lowbit knows of each architecture it writes to GGUF and reads back, as data.

The writer (write.py) and the reader (read.py) both read these facts; neither imports the other.
An architecture is its GGUF name, its tensor names, which tensors are transformed on the way out
(q/k rows permuted for llama's rotary layout) and which hyper-parameters it writes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from torch import nn


@dataclass(frozen=True)
class Arch:
    """How one transformers model_type maps to llama.cpp: its GGUF architecture name and whether
    attn_q / attn_k rows are permuted (llama.cpp's llama graph expects rotary pairs (i, i + d/2)
    interleaved as (2i, 2i + 1); transformers' GGUF reader undoes the same permutation)."""
    gguf: str
    permute_qk: bool


ARCHS = {"llama": Arch("llama", True), "mistral": Arch("llama", True), "qwen2": Arch("qwen2", False)}

# transformers parameter name -> GGUF tensor name ({i}: block index)
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def gguf_name(hf_name: str) -> tuple[str, int]:
    """("model.layers.3.mlp.up_proj.weight") -> ("blk.3.ffn_up.weight", 3); layer -1 outside the blocks."""
    if hf_name in _TOP:
        return _TOP[hf_name], -1
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}", int(m.group(1))
    raise ValueError(f"tensor {hf_name!r} has no GGUF name in lowbit's table for this architecture")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """w: [n_head * d, in] -> same shape, rows of each head reordered from (first half, second half)
    to interleaved pairs, as llama.cpp's converter does for q/k of Llama models."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of arch.permute_rows: interleaved rotary pairs back to (first half, second half)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permuted_heads(name: str, arch: Arch, config) -> int:
    """The head count by which a GGUF q/k tensor's rows are permuted (llama.cpp's converter interleaves
    rotary pairs for Llama models), 0 for every other tensor."""
    if arch.permute_qk and ".attn_q." in name:
        return config.num_attention_heads
    if arch.permute_qk and ".attn_k." in name:
        return config.num_key_value_heads
    return 0


def model_arch(model: nn.Module):
    config = getattr(model, "config", None)
    arch = ARCHS.get(getattr(config, "model_type", None))
    if arch is None:
        raise ValueError(f"GGUF export knows the architectures {', '.join(ARCHS)}; this model is "
                         f"{getattr(config, 'model_type', type(model).__name__)!r}")
    return config, arch


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default") if params else getattr(config, "rope_scaling", None)
    if kind not in (None, "default"):
        raise ValueError(f"GGUF export: rope scaling {kind!r} is not supported yet (only plain RoPE)")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def write_hparams(w, config, arch: Arch) -> None:
    a = arch.gguf
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_uint32(f"{a}.context_length", config.max_position_embeddings)
    w.add_uint32(f"{a}.embedding_length", config.hidden_size)
    w.add_uint32(f"{a}.feed_forward_length", config.intermediate_size)
    w.add_uint32(f"{a}.block_count", config.num_hidden_layers)
    w.add_uint32(f"{a}.attention.head_count", config.num_attention_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", config.num_key_value_heads)
    w.add_float32(f"{a}.rope.freq_base", _rope_theta(config))
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    w.add_uint32(f"{a}.vocab_size", config.vocab_size)
    w.add_uint32(f"{a}.rope.dimension_count", head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        w.add_uint32(f"{a}.attention.key_length", head_dim)
        w.add_uint32(f"{a}.attention.value_length", head_dim)
