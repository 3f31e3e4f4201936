"""What lowbit knows of each architecture it writes to GGUF and reads back, as data.

    arch = ARCHS["qwen3"]                       # Arch(model_type="qwen3", gguf="qwen3", ...)
    gguf_name("model.layers.3.mlp.up_proj.weight", arch)      # ("blk.3.ffn_up.weight", 3)
    hparams(config, arch)                       # {"qwen3.block_count": 28, ...} as llama.cpp reads them
    config_kwargs(meta, arch)                   # the transformers config arguments back from those keys

The writer (write.py) and the reader (read.py) both read these facts; neither imports the other.
An architecture is one Arch entry: its GGUF name (gguf-py's MODEL_ARCH_NAMES), which tensors are
transformed on the way out (q/k rows permuted for llama's rotary layout, Gemma's norms stored as
1 + w), which hyper-parameters it writes beyond the common ones (Field: GGUF key <-> transformers
config attribute), and what llama.cpp's graph for it assumes of a config (`requires`). Tensor names
come from gguf-py's TensorNameMap, which holds the transformers names of every architecture
llama.cpp knows; a block's experts (`mlp.experts.{e}.gate_proj`, nn.RoutedExperts, or 4.x's
per-expert Linear layers) are stacked into one [E, out, in] tensor (`ffn_gate_exps`).
The facts follow llama.cpp's converter (convert_hf_to_gguf.py, conversion/*.py) and its loader
(src/models/*.cpp) of the llama.cpp that llama-cpp-python 0.3.36 vendors.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
from torch import nn


@dataclass(frozen=True)
class Field:
    """One hyper-parameter: GGUF key `{arch}.<key>` <-> transformers config attribute `attr`.
    optional: written only when the config holds a value (not None, not 0), read only when present."""
    key: str
    attr: str
    kind: type = int
    optional: bool = False


@dataclass(frozen=True)
class Arch:
    """How one transformers model_type maps to llama.cpp.

    permute_qk: attn_q / attn_k rows permuted from transformers' rotary halves (i, i + d/2) to
      llama.cpp's interleaved pairs (2i, 2i + 1) (its "normal" rope; NEOX-rope models keep the rows);
    norm_offset: GGUF norms hold w + offset (Gemma's RMSNorm computes x * (1 + w), llama.cpp's x * w);
    sliding: llama.cpp reads sliding windows (`attention.sliding_window` + a per-layer pattern);
    rope_by_layer_type: rope_parameters per layer type (Gemma 3: its own theta for sliding layers);
    rope_freqs: llama.cpp's graph reads `rope_freqs.weight` (llama3 rope scaling);
    requires: (config attribute, its value given the rest of the config, why): what llama.cpp's graph
      assumes; the writer refuses a config that differs, the reader sets these values."""
    model_type: str
    gguf: str
    permute_qk: bool = False
    norm_offset: float = 0.0
    fields: tuple[Field, ...] = ()
    sliding: bool = False
    rope_by_layer_type: bool = False
    rope_freqs: bool = False
    requires: tuple[tuple[str, Callable, str], ...] = ()


COMMON = (Field("context_length", "max_position_embeddings"), Field("embedding_length", "hidden_size"),
          Field("feed_forward_length", "intermediate_size"), Field("block_count", "num_hidden_layers"),
          Field("attention.head_count", "num_attention_heads"),
          Field("attention.head_count_kv", "num_key_value_heads"),
          Field("attention.layer_norm_rms_epsilon", "rms_norm_eps", float), Field("vocab_size", "vocab_size"))
MIXTRAL_EXPERTS = (Field("expert_count", "num_local_experts"), Field("expert_used_count", "num_experts_per_tok"))
QWEN_EXPERTS = (Field("expert_count", "num_experts"), Field("expert_used_count", "num_experts_per_tok"),
                Field("expert_feed_forward_length", "moe_intermediate_size"))
GEMMA = (Field("final_logit_softcapping", "final_logit_softcapping", float, optional=True),)
GRANITE = (Field("attention.scale", "attention_multiplier", float), Field("embedding_scale", "embedding_multiplier", float),
           Field("residual_scale", "residual_multiplier", float), Field("logit_scale", "logits_scaling", float))


def _gemma_query_scale(layers_27b: int):
    """llama.cpp scales Gemma's queries by 1/sqrt(head_dim), by 1/sqrt(hidden / heads) for the 27B
    (which it knows by its layer count); transformers by 1/sqrt(query_pre_attn_scalar)."""
    return lambda c: c.hidden_size // c.num_attention_heads if c.num_hidden_layers == layers_27b else head_dim(c)


def _const(v):
    return lambda c: v


# (config attribute, its value as llama.cpp's graph assumes it given the rest of the config, why)
SILU = ("hidden_act", _const("silu"), "llama.cpp's graph uses SiLU")
NO_BIAS = (("attention_bias", _const(False), "llama.cpp's graph adds no attention bias"),
           ("mlp_bias", _const(False), "llama.cpp's graph adds no MLP bias"))
ALL_MOE = (("decoder_sparse_step", _const(1), "llama.cpp's graph makes every layer MoE"),
           ("mlp_only_layers", _const([]), "llama.cpp's graph makes every layer MoE"))
GEMMA_NEEDS = (("hidden_activation", _const("gelu_pytorch_tanh"), "llama.cpp's Gemma graph uses tanh-GELU"),
               ("tie_word_embeddings", _const(True), "llama.cpp's Gemma graph reads the output from token_embd"),
               NO_BIAS[0])
LLAMA = dict(gguf="llama", permute_qk=True, rope_freqs=True, requires=(SILU, *NO_BIAS))

ARCHS: dict[str, Arch] = {a.model_type: a for a in (
    Arch("llama", **LLAMA),
    Arch("mistral", **LLAMA),
    Arch("mixtral", fields=MIXTRAL_EXPERTS, **LLAMA),
    Arch("qwen2", "qwen2", requires=(SILU,)),
    Arch("qwen3", "qwen3", requires=(SILU, *NO_BIAS)),
    Arch("qwen2_moe", "qwen2moe", fields=(*QWEN_EXPERTS, Field("expert_shared_feed_forward_length",
                                                              "shared_expert_intermediate_size")),
         requires=(SILU, *ALL_MOE, ("norm_topk_prob", _const(False),
                                    "llama.cpp's qwen2moe graph keeps the routed weights as they are"))),
    Arch("qwen3_moe", "qwen3moe", fields=QWEN_EXPERTS,
         requires=(SILU, *NO_BIAS, *ALL_MOE, ("norm_topk_prob", _const(True),
                                              "llama.cpp's qwen3moe graph normalizes the routed weights"))),
    Arch("gemma2", "gemma2", norm_offset=1.0, sliding=True,
         fields=(Field("attn_logit_softcapping", "attn_logit_softcapping", float, optional=True), *GEMMA,
                 Field("attention.sliding_window", "sliding_window")),
         requires=(*GEMMA_NEEDS, ("query_pre_attn_scalar", _gemma_query_scale(46), "llama.cpp scales queries so"))),
    Arch("gemma3_text", "gemma3", norm_offset=1.0, sliding=True, rope_by_layer_type=True,
         fields=(*GEMMA, Field("attention.sliding_window", "sliding_window", optional=True)),
         requires=(*GEMMA_NEEDS, ("query_pre_attn_scalar", _gemma_query_scale(62), "llama.cpp scales queries so"),
                   ("attn_logit_softcapping", _const(None), "llama.cpp's gemma3 graph has no attention softcap"))),
    Arch("phi3", "phi3", requires=(SILU, ("sliding_window", _const(None), "llama.cpp runs Phi-3 without one"))),
    Arch("olmo2", "olmo2", requires=(SILU, *NO_BIAS)),
    Arch("granite", "granite", permute_qk=True, rope_freqs=True, fields=GRANITE, requires=(SILU, *NO_BIAS)),
    Arch("smollm3", "smollm3", permute_qk=True,
         requires=(SILU, *NO_BIAS, ("no_rope_layers", lambda c: [int((i + 1) % 4 != 0) for i in range(c.num_hidden_layers)],
                                    "llama.cpp's smollm3 graph skips rope in every 4th layer"))),
)}
LLAMA3_KEY = "lowbit.rope.llama3"  # llama.cpp keeps llama3 rope scaling only as rope_freqs.weight; this key keeps the config


def _same(a, b) -> bool:
    return a == b or (not a and not b)  # unset (None), False, 0 and [] all say "none"


def model_arch(model: nn.Module):
    """(config, Arch) of a transformers model lowbit writes to GGUF, or a ValueError naming what it knows."""
    config = getattr(model, "config", None)
    arch = ARCHS.get(getattr(config, "model_type", None))
    if arch is None:
        raise ValueError(f"GGUF export knows the architectures {', '.join(ARCHS)}; this model is "
                         f"{getattr(config, 'model_type', type(model).__name__)!r}")
    broken = [f"{attr}={want(config)!r} ({why}; this config: {getattr(config, attr, None)!r})"
              for attr, want, why in arch.requires if not _same(getattr(config, attr, None), want(config))]
    if broken:
        raise ValueError(f"GGUF export: llama.cpp would compute another model than this {arch.model_type} config: "
                         f"it needs {'; '.join(broken)}")
    return config, arch


# -- tensor names ------------------------------------------------------------------------------------

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


@functools.lru_cache(maxsize=None)
def _name_map(gguf_arch: str):
    """gguf-py's TensorNameMap for one block (block numbers are put back by gguf_name)."""
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(by_name[gguf_arch], 1)


def gguf_name(hf_name: str, arch: Arch | None = None) -> tuple[str, int]:
    """("model.layers.3.mlp.up_proj.weight") -> ("blk.3.ffn_up.weight", 3); layer -1 outside the blocks.
    An expert's weight (`model.layers.3.mlp.experts.5.up_proj.weight`) names the stacked tensor
    (`blk.3.ffn_up_exps.weight`) that holds it at index 5 (expert_index)."""
    arch = arch or ARCHS["llama"]
    m = _LAYER.search(hf_name)
    layer = int(m.group(1)) if m else -1
    generic = _EXPERT.sub(".experts.", _LAYER.sub(".layers.0.", hf_name, count=1), count=1)
    name = _name_map(arch.gguf).get_name(generic, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"tensor {hf_name!r} has no GGUF name for architecture {arch.gguf} (gguf-py's "
                         "TensorNameMap)")
    return (name.replace("blk.0.", f"blk.{layer}.", 1) if layer >= 0 else name), layer


def expert_index(hf_name: str) -> int | None:
    """The expert a per-expert weight belongs to (`...experts.5.up_proj.weight` -> 5), None for others."""
    m = _EXPERT.search(hf_name)
    return int(m.group(1)) if m else None


def tensor_groups(state, arch: Arch, n_exp: int) -> dict[str, tuple[int, list[str]]]:
    """{GGUF name: (block index, the transformers keys it holds)} in file order: one key per tensor,
    a block's experts (`mlp.experts.{e}.up_proj.weight`) in expert order for a stacked tensor."""
    groups: dict[str, tuple[int, list[str]]] = {}
    for key in state:
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name, layer = gguf_name(key, arch)
        groups.setdefault(name, (layer, []))[1].append(key)
    for name, (_, keys) in groups.items():
        experts = [expert_index(k) for k in keys]
        if experts[0] is None:
            if len(keys) > 1:
                raise ValueError(f"tensors {keys[0]!r} and {keys[1]!r} both have GGUF name {name!r}")
            continue
        keys.sort(key=expert_index)
        if sorted(experts) != list(range(n_exp)):
            raise ValueError(f"tensor {name!r} stacks experts {sorted(experts)[:8]}...; the config has {n_exp}")
    return groups


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


def value_offset(hf_name: str, arch: Arch) -> float:
    """What the GGUF tensor adds to the transformers weight: Gemma's norms are stored as 1 + w."""
    return arch.norm_offset if hf_name.endswith("norm.weight") else 0.0


def n_expert(config) -> int:
    """Experts per MoE layer (0 for a dense model)."""
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0)


# -- hyper-parameters --------------------------------------------------------------------------------

def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config) -> dict:
    """transformers 5's rope_parameters (per layer type for Gemma 3), or 4.x's rope_scaling + rope_theta."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        params.setdefault("rope_type", params.get("type", "default"))
    return params


def _rope_hparams(config, arch: Arch) -> dict:
    params = rope_parameters(config)
    full = params.get("full_attention", params)
    out = {"rope.freq_base": float(full.get("rope_theta", 10000.0)),
           "rope.dimension_count": int(head_dim(config) * full.get("partial_rotary_factor", 1.0))}
    if "sliding_attention" in params:
        out["rope.freq_base_swa"] = float(params["sliding_attention"]["rope_theta"])
        if params["sliding_attention"].get("rope_type", "default") != "default":
            raise ValueError("GGUF export: llama.cpp applies no rope scaling to sliding-window layers; this "
                             f"config scales them ({params['sliding_attention']})")
    kind = full.get("rope_type", "default")
    if kind == "linear":
        out.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(full["factor"])})
    elif kind == "yarn":
        out.update(_yarn(full, config))
    elif kind == "llama3" and arch.rope_freqs:
        out[LLAMA3_KEY] = json.dumps({k: full[k] for k in LLAMA3_PARAMS})
    elif kind != "default":
        raise ValueError(f"GGUF export: rope scaling {kind!r} is not one llama.cpp's {arch.gguf} graph reads "
                         f"(lowbit writes linear, yarn{', llama3' if arch.rope_freqs else ''})")
    return out


LLAMA3_PARAMS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# transformers' yarn parameter -> llama.cpp's key (its defaults: beta_fast 32, beta_slow 1, as transformers')
YARN_KEYS = {"beta_fast": "rope.scaling.yarn_beta_fast", "beta_slow": "rope.scaling.yarn_beta_slow"}


def _yarn(p: dict, config) -> dict:
    """llama.cpp's yarn: ramp between beta_fast and beta_slow rotations (truncated to whole dimensions,
    transformers' truncate=True), attention scaled by 0.1 ln(factor) + 1, which it computes itself."""
    if p.get("truncate", True) is False or p.get("mscale") or p.get("mscale_all_dim"):
        raise ValueError(f"GGUF export: yarn with truncate=False or mscale is not what llama.cpp computes ({p})")
    factor = float(p["factor"])
    if p.get("attention_factor") not in (None, 0.1 * math.log(factor) + 1.0):
        raise ValueError(f"GGUF export: yarn attention_factor {p['attention_factor']} is not 0.1 ln(factor) + 1, "
                         "which llama.cpp applies")
    orig = p.get("original_max_position_embeddings") or config.max_position_embeddings
    out = {"rope.scaling.type": "yarn", "rope.scaling.factor": factor, "rope.scaling.original_context_length": int(orig)}
    out.update({key: float(p[k]) for k, key in YARN_KEYS.items() if p.get(k) is not None})
    return out


def _sliding_hparams(config, arch: Arch) -> dict:
    types = getattr(config, "layer_types", None) or []
    if not arch.sliding or "sliding_attention" not in types:
        return {}
    return {"attention.sliding_window_pattern": [t == "sliding_attention" for t in types]}


def hparams(config, arch: Arch) -> dict[str, object]:
    """{GGUF key: value} of `config` as llama.cpp reads them for `arch` (int: uint32, float: float32,
    str: string, list of bool: array), in writing order."""
    out = {}
    for f in (*COMMON, *arch.fields):
        v = getattr(config, f.attr, None)
        if f.optional and not v:
            continue
        if v is None:
            raise ValueError(f"GGUF export: the {arch.model_type} config has no {f.attr} (GGUF {f.key})")
        out[f"{arch.gguf}.{f.key}"] = f.kind(v)
    hd = head_dim(config)
    out[f"{arch.gguf}.attention.key_length"] = out[f"{arch.gguf}.attention.value_length"] = hd
    for k, v in (*_rope_hparams(config, arch).items(), *_sliding_hparams(config, arch).items()):
        out[k if k.startswith("lowbit.") else f"{arch.gguf}.{k}"] = v
    return out


def rope_freqs(config) -> np.ndarray | None:
    """llama.cpp's `rope_freqs.weight` [head_dim / 2] for llama3 rope scaling: the factor dividing each
    rotary frequency (1 above the high-frequency wavelength, `factor` below the low one, smooth between;
    transformers' _compute_llama3_parameters); None for every other rope."""
    p = rope_parameters(config)
    if p.get("rope_type") != "llama3":
        return None
    d = head_dim(config)
    freqs = 1.0 / (p["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
    wavelen = 2 * math.pi / freqs
    old, lo, hi, factor = (p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"],
                           p["factor"])
    smooth = (old / wavelen - lo) / (hi - lo)
    between = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, factor, between))
    return out.astype(np.float32)


def llama3_from_rope_freqs(freqs: np.ndarray, rope_theta: float, head_dim: int) -> dict:
    """The llama3 rope parameters whose rope_freqs() is `freqs` (a file llama.cpp's converter wrote keeps
    only the tensor). Between the two plateaus 1 / r = (1 - s) / factor + s with s linear in 1 / wavelength:
    its slope and intercept give the low and high frequency factors for an original context of 8192 (any
    context with the factors scaled alike gives the same frequencies); checked by recomputing them."""
    freqs = np.asarray(freqs, dtype=np.float64)
    factor = float(freqs.max())
    inv_wavelen = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)) / (2 * math.pi)
    between = (freqs > 1 + 1e-6) & (freqs < factor - 1e-6 * factor)
    if freqs.shape != inv_wavelen.shape or factor <= 1 or between.sum() < 2:
        raise ValueError("rope_freqs.weight is not llama3 rope scaling lowbit can read back (it needs "
                         f"{len(inv_wavelen)} factors from 1 to the scaling factor, two or more between)")
    s = (1 / freqs[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_wavelen[between], s, 1)
    old = 8192
    lo = -intercept * old / slope
    params = dict(factor=factor, low_freq_factor=float(lo), high_freq_factor=float(lo + old / slope),
                  original_max_position_embeddings=old)
    config = SimpleNamespace(rope_parameters=dict(rope_type="llama3", rope_theta=rope_theta, **params),
                             head_dim=head_dim)
    if not np.allclose(rope_freqs(config), freqs, rtol=1e-4):
        raise ValueError("rope_freqs.weight is not llama3 rope scaling: no factors reproduce it")
    return params


def config_kwargs(meta: dict, arch: Arch, get: Callable) -> dict:
    """The transformers config arguments a GGUF file's metadata `meta` gives for `arch`; `get(key,
    kind, optional)` reads and checks one `{arch}.<key>` (read.py's checks)."""
    kw = {}
    for f in (*COMMON, *arch.fields):
        v = get(f.key, f.kind, f.optional)
        if v is not None:
            kw[f.attr] = v
    kw["head_dim"] = get("attention.key_length", int, True) or kw["hidden_size"] // kw["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": get("rope.freq_base", float, True) or 10000.0}
    kind = meta.get(f"{arch.gguf}.rope.scaling.type")
    if kind == "linear":
        rope.update(rope_type="linear", factor=get("rope.scaling.factor", float, False))
    elif kind == "yarn":
        rope.update(rope_type="yarn", factor=get("rope.scaling.factor", float, False),
                    original_max_position_embeddings=get("rope.scaling.original_context_length", int, False))
        rope.update({k: v for k, key in YARN_KEYS.items() if (v := get(key, float, True)) is not None})
    elif LLAMA3_KEY in meta and arch.rope_freqs:
        rope.update(rope_type="llama3", **json.loads(meta[LLAMA3_KEY]))
    elif kind not in (None, "none"):
        raise ValueError(f"rope scaling {kind!r} is not one lowbit reads (linear, yarn, llama3)")
    dims = get("rope.dimension_count", int, True)
    if dims and dims != kw["head_dim"]:
        rope["partial_rotary_factor"] = dims / kw["head_dim"]
    pattern = meta.get(f"{arch.gguf}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        kw["layer_types"] = ["sliding_attention" if b else "full_attention" for b in pattern]
    if arch.rope_by_layer_type:
        swa = get("rope.freq_base_swa", float, True) or 10000.0
        rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": swa}}
    kw["rope_parameters"] = rope
    given = SimpleNamespace(**kw)
    kw.update({attr: want(given) for attr, want, _ in arch.requires})
    return kw


def support_table() -> str:
    """docs/gguf.md's table of the architectures lowbit writes and reads, from ARCHS."""
    rows = ["| transformers model_type | GGUF architecture | transforms on the way out | hyper-parameters beyond "
            "the common ones | what llama.cpp's graph assumes (other configs are refused) |", "|---|---|---|---|---|"]
    for a in ARCHS.values():
        transforms = [t for t, on in (("q/k rows permuted", a.permute_qk), (f"norms + {a.norm_offset:g}", a.norm_offset),
                                      ("experts stacked", any(f.key == "expert_count" for f in a.fields)),
                                      ("llama3 rope as rope_freqs.weight", a.rope_freqs)) if on]
        keys = [f.key for f in a.fields] + (["attention.sliding_window_pattern"] if a.sliding else []) \
            + (["rope.freq_base_swa"] if a.rope_by_layer_type else [])
        needs = [_need(attr, want) for attr, want, _ in a.requires]
        rows.append(f"| {a.model_type} | {a.gguf} | {', '.join(transforms) or '-'} | {', '.join(keys) or '-'} "
                    f"| {', '.join(needs) or '-'} |")
    return "\n".join(rows) + "\n"


def _need(attr: str, want: Callable) -> str:
    """`attr=value` for a constant requirement, the attribute alone for one computed from the config."""
    try:
        return f"{attr}={want(None)!r}"
    except AttributeError:
        return f"{attr} (see arch.py)"
