"""Read GGUF files: tensors as float32 torch tensors, or a whole transformers model.

    w = read_gguf_tensors("model.gguf", ["blk.0.attn_q.weight"])   # GGUF names and layout
    model = load_gguf("model.gguf")                                 # transformers names, q/k un-permuted
    model = load_gguf("model.gguf", keep_quantized=True)            # q4_0/q8_0/q4_k Linear layers as QuantLinear

Blocks are decoded by lowbit.core.ggml_blocks; types lowbit has no decoder for go through gguf-py.
A GGUF file is data from outside: any file, truncated, corrupt or with impossible sizes, gives a
ValueError naming the file (tests/test_io_fuzz.py), never another exception.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...core.ggml_blocks import type_by_id
from ...nn.linear import QuantLinear
from .. import checks
from .arch import (ARCHS, Arch, config_kwargs, llama3_from_rope_freqs, n_expert, permuted_heads, tensor_groups,
                   unpermute_rows, value_offset)
from .file import GGUFFile, TensorInfo, parse_gguf, tensor_bytes, tensor_nbytes, type_sizes
from .qtensor import SCHEMES, split_blocks, to_qtensor


def _block_of(f: GGUFFile, info: TensorInfo) -> tuple[int, int]:
    """(values per block, bytes per block) of a tensor's GGML type, or a clear error."""
    sizes = type_sizes(info.type_id)
    if sizes is None:
        _gguf_package(f, info)  # without gguf-py, say that is what is missing
        raise ValueError(f"{f.path}: tensor {info.name!r} has unknown GGML type {info.type_id}")
    return sizes


def _gguf_package(f: GGUFFile, info: TensorInfo):
    try:
        import gguf
    except ImportError as e:  # optional dependency
        raise ValueError(f"{f.path}: tensor {info.name!r} has GGML type {info.type_id}, which lowbit reads "
                         "through the 'gguf' package: pip install 'lowbit[models]'") from e
    return gguf


def _dequantize(f: GGUFFile, info: TensorInfo) -> np.ndarray:
    t = type_by_id(info.type_id)
    data = np.ascontiguousarray(tensor_bytes(f, info, *_block_of(f, info)))
    if t is not None:
        return t.dequantize(data.reshape(-1, t.type_size)).reshape(info.shape)
    from gguf.quants import dequantize

    qt = _gguf_package(f, info).GGMLQuantizationType(info.type_id)
    return dequantize(data, qt).reshape(info.shape)


def read_gguf_tensors(path: str | Path, names=None) -> dict[str, torch.Tensor]:
    """{name: float32 tensor in PyTorch layout ([out, in] for weights)}; `names` filters by exact name."""
    f = parse_gguf(path)
    wanted = list(f.tensors) if names is None else list(names)
    missing = [n for n in wanted if n not in f.tensors]
    if missing:
        raise ValueError(f"{f.path} has no tensor named {missing[0]!r}")
    return {n: _tensor(_dequantize(f, f.tensors[n])) for n in wanted}


def _tensor(w: np.ndarray) -> torch.Tensor:
    """float32 torch tensor that owns its memory (F32 tensors arrive as views of the read-only file map)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    return torch.from_numpy(w if w.flags.writeable else w.copy())


def _llama3_rope(f: GGUFFile, kw: dict) -> dict:
    """The llama3 rope parameters rope_freqs.weight stands for (a file without lowbit's LLAMA3_KEY)."""
    info = f.tensors["rope_freqs.weight"]
    if info.shape != (kw["head_dim"] // 2,):
        raise ValueError(f"{f.path}: rope_freqs.weight has shape {info.shape}; the heads need ({kw['head_dim'] // 2},)")
    theta = kw["rope_parameters"]["rope_theta"]
    try:
        params = llama3_from_rope_freqs(_dequantize(f, info), theta, kw["head_dim"])
    except ValueError as e:
        raise ValueError(f"{f.path}: {e}") from e
    return dict(rope_type="llama3", rope_theta=theta, **params)


def _config(f: GGUFFile):
    """(config, Arch) from the metadata through arch.config_kwargs; every size checked to be a positive
    integer and the block count to match the tensor table, before a model of that size is built."""
    import transformers as tf

    a = f.meta.get("general.architecture")
    arch = _arch_of(f, a)

    def get(key, kind=int, optional=False):
        if f"{a}.{key}" not in f.meta:
            if optional:
                return None
            raise ValueError(f"{f.path}: metadata {a}.{key} is missing")
        v = f.meta[f"{a}.{key}"]
        ok = isinstance(v, int) and v > 0 if kind is int else isinstance(v, (int, float)) and v >= 0
        if isinstance(v, bool) or not ok:
            raise ValueError(f"{f.path}: metadata {a}.{key} is {v!r:.40}; it must be a "
                             f"{'positive integer' if kind is int else 'non-negative number'}")
        return v

    if f"{a}.vocab_size" not in f.meta and f.meta.get("tokenizer.ggml.tokens"):
        f.meta[f"{a}.vocab_size"] = len(f.meta["tokenizer.ggml.tokens"])  # llama.cpp's converters may leave it out
    try:
        kw = config_kwargs(f.meta, arch, get)
    except ValueError as e:
        raise ValueError(f"{f.path}: {e}") from e
    _block_count(f, kw["num_hidden_layers"])
    if kw["head_dim"] % 2:  # rotary pairs; q/k rows are un-permuted by pairs
        raise ValueError(f"{f.path}: metadata {a}.attention.key_length is {kw['head_dim']}; rotary heads "
                         "need an even size")
    if "rope_freqs.weight" in f.tensors and "llama3" not in str(kw["rope_parameters"]):
        kw["rope_parameters"] = _llama3_rope(f, kw)  # llama.cpp's converter writes the tensor alone
    kw.update(tie_word_embeddings="output.weight" not in f.tensors,
              bos_token_id=f.meta.get("tokenizer.ggml.bos_token_id"),
              eos_token_id=f.meta.get("tokenizer.ggml.eos_token_id"),
              pad_token_id=f.meta.get("tokenizer.ggml.padding_token_id"))
    try:
        config = tf.AutoConfig.for_model(arch.model_type, **kw)
    except Exception as e:  # transformers validates config fields with several exception kinds
        raise ValueError(f"{f.path}: the metadata is not a valid {arch.model_type} config: {e}") from e
    return config, arch


def _arch_of(f: GGUFFile, a) -> Arch:
    """The Arch for GGUF architecture `a`: of those sharing the name (llama, mistral, mixtral), the one
    with the most hyper-parameters, all present (a file with expert counts is a mixtral)."""
    fits = [x for x in ARCHS.values() if x.gguf == a
            and all(f"{a}.{k.key}" in f.meta for k in x.fields if not k.optional)]
    if not fits:
        raise ValueError(f"{f.path}: architecture {str(a)[:40]!r} is not one lowbit builds a model for "
                         f"({', '.join(sorted({v.gguf for v in ARCHS.values()}))}); read_gguf_tensors reads its tensors")
    return max(fits, key=lambda x: len(x.fields))


def _build(config):
    """The transformers model for `config`, its fused experts as nn.RoutedExperts (one Linear per expert,
    as the writer names them)."""
    import transformers as tf

    from ...pipeline.experts import unfuse_experts

    model = tf.AutoModelForCausalLM.from_config(config)
    unfuse_experts(model)
    return model


def _block_count(f: GGUFFile, n: int) -> int:
    """block_count, if the tensor table holds blocks 0..n-1 (a model of n blocks is built from it)."""
    blocks = {int(k.split(".")[1]) for k in f.tensors if k.startswith("blk.") and k.split(".")[1].isdigit()}
    if len(blocks) != n or max(blocks, default=-1) != n - 1:  # (never range(n): n is the file's number)
        held = f"blocks 0..{max(blocks)} ({len(blocks)} of them)" if blocks else "no block"
        raise ValueError(f"{f.path}: metadata block_count is {n} but the tensor table holds {held}")
    return n


def _plan(f: GGUFFile, config, arch) -> dict[str, list[str]]:
    """GGUF tensor name -> the model's parameter names it holds (one, or a block's experts in order),
    once the tensor table matches the model the config describes (built on the meta device: no
    memory) name for name and shape for shape, and every tensor lies inside the file. After this
    the model's size is the file's, dequantized."""

    model = checks.on_meta(lambda: _build(config), f.path, f"the metadata cannot build a {arch.model_type} model")
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    by_gguf = {name: keys for name, (_, keys) in tensor_groups(state, arch, n_expert(config)).items()}
    plan = {}
    for name, info in f.tensors.items():
        if name == "rope_freqs.weight":  # llama3 rope: the config holds its parameters (arch.LLAMA3_KEY)
            continue
        if name not in by_gguf:
            raise ValueError(f"{f.path}: tensor {name!r} does not belong to a {arch.gguf} model")
        keys = plan[name] = by_gguf.pop(name)
        expected = tuple(state[keys[0]].shape)
        expected = (len(keys), *expected) if len(keys) > 1 else expected
        if info.shape != expected:
            raise ValueError(f"{f.path}: tensor {name!r} has shape {info.shape}, the config says {expected}")
        tensor_nbytes(f, info, *_block_of(f, info))
    if by_gguf:
        raise ValueError(f"{f.path}: tensor {sorted(by_gguf)[0]!r} is missing ({len(by_gguf)} in all)")
    return plan


def load_gguf(path: str | Path, keep_quantized: bool = False):
    """A transformers model (eval mode, float32, dequantized) from a GGUF file of an architecture in
    gguf/arch.py (its config rebuilt from the metadata by arch.config_kwargs; MoE experts as
    nn.RoutedExperts); lowbit.load_model(path) also builds its tokenizer (through transformers, slower).

    keep_quantized: every Linear weight stored as q4_0, q8_0 or q4_k becomes a QuantLinear holding the
    file's codes and scales as a QTensor (int4 or int8 with fp16 scales, dequantizing bit for bit to
    the float model's weight; q4_k as uint4 with float32 scales and zeros, within float32 rounding;
    PerGroup(32); see gguf.qtensor), which runs lowbit's packed-code kernels. Every other type (f32,
    f16, bf16, q4_1, q5_0, q5_1, the other k-quants, i-quants), the embeddings and the norms load as
    float32, as they do by default.

    Every number in the metadata is checked against the tensor table before the model is built, so
    a few bytes asking for a model of gigabytes are a ValueError, not an allocation."""

    f = parse_gguf(path)
    config, arch = _config(f)
    plan = _plan(f, config, arch)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = _build(config)
    state, kept = {}, {}
    for name, keys in plan.items():
        info = f.tensors[name]
        n_head = permuted_heads(name, arch, config)
        if len(keys) > 1:  # a block's experts, stacked [E, out, in]: loaded as float
            for key, w in zip(keys, _dequantize(f, info)):
                state[key] = _tensor(w)
            continue
        key = keys[0]
        t = _kept_type(model, key, info) if keep_quantized else None
        split = split_blocks(tensor_bytes(f, info, t.block_size, t.type_size), t.name, info.shape) if t else None
        if split is not None:
            if n_head:
                split = [None if a is None else unpermute_rows(a, n_head) for a in split]
            codes, scales, zeros = split
            kept[key.removesuffix(".weight")] = to_qtensor(codes, scales, t.name, zeros)
            continue
        w = _dequantize(f, info) - value_offset(key, arch)
        state[key] = _tensor(unpermute_rows(w, n_head) if n_head else w)
    model.load_state_dict(state, strict=False, assign=True)
    for name, q in kept.items():  # after the state: QuantLinear copies the layer's (loaded) bias
        model.set_submodule(name, QuantLinear.from_linear(model.get_submodule(name), q))
    if config.tie_word_embeddings:
        model.tie_weights()
    model.lowbit_gguf_source = str(f.path)
    return model.eval()


def _kept_type(model, key: str, info: TensorInfo):
    """The GGML type of a Linear layer's weight that gguf.qtensor keeps quantized, else None."""
    t = type_by_id(info.type_id)
    if t is None or t.name not in SCHEMES or not key.endswith(".weight") or len(info.shape) != 2:
        return None
    return t if isinstance(model.get_submodule(key.removesuffix(".weight")), torch.nn.Linear) else None
