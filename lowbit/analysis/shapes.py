"""A model's modules and tensor shapes without its weights, for the memory calculator.

The model is built on the meta device (transformers' from_config: names, shapes, tied weights,
no storage), so the pipeline's own selection (pipeline.plan, embedding_targets) applies to it
as it would to the loaded model. Sources:

    a Hugging Face folder     config.json; dtype and parameter count from the safetensors headers
    a .gguf file              its metadata (lowbit's GGUF parser); held in fp32, as lowbit loads it
    a bare .safetensors file  its header: 2-D `X.weight` tensors become Linear layers ("embed" in
                              the name: embedding tables), the rest stays as it is
    "8B", "70B", ...          a Llama 3 / Llama 2 config from LLAMA_SIZES; other counts: square
                              4096 x 4096 Linear layers adding up to the count (no embeddings, no
                              KV cache: the shape is unknown)
    an nn.Module              itself (counting reads shapes only)
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

META = torch.device("meta")

# name: (hidden, layers, heads, kv heads, intermediate, vocab, tied) of the published configs
LLAMA_SIZES = {
    "1B": (2048, 16, 32, 8, 8192, 128256, True),      # Llama 3.2 1B
    "3B": (3072, 28, 24, 8, 8192, 128256, True),      # Llama 3.2 3B
    "7B": (4096, 32, 32, 32, 11008, 32000, False),    # Llama 2 7B
    "8B": (4096, 32, 32, 8, 14336, 128256, False),    # Llama 3.1 8B
    "13B": (5120, 40, 40, 40, 13824, 32000, False),   # Llama 2 13B
    "70B": (8192, 80, 64, 8, 28672, 128256, False),   # Llama 3.1 70B
    "405B": (16384, 126, 128, 8, 53248, 128256, False),  # Llama 3.1 405B
}
SQUARE = 4096  # width of the stand-in matrices for a parameter count with no table entry
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class ModelShapes:
    model: nn.Module  # on the meta device (or the module given)
    dtype: torch.dtype  # what the unquantized tensors are held in
    source: str  # where the shapes came from, in words
    layers: int | None = None  # for the KV cache; None: no KV cache (encoder) or unknown shape
    kv_heads: int | None = None
    head_dim: int | None = None
    checkpoint_params: int | None = None  # elements in the checkpoint's headers, when read
    saved: dict | None = None  # a checkpoint's own bytes as stored (saved_parts), when read


def parse_size(text: str) -> float | None:
    """"8B" -> 8e9, "135M" -> 1.35e8; None when `text` is not a parameter count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMBT])\s*", str(text), re.IGNORECASE)
    return float(m.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2).upper()] if m else None


def model_shapes(source: "str | Path | nn.Module", dtype: torch.dtype | None = None) -> ModelShapes:
    """Shapes of `source` (see the module doc); `dtype` overrides the dtype of unquantized tensors.

    Example: model_shapes("8B").model.lm_head.weight.shape -> (128256, 4096), on the meta device
    """
    if isinstance(source, nn.Module):
        w = next((p for p in source.parameters() if p.is_floating_point()), None)
        out = ModelShapes(source, w.dtype if w is not None else torch.float32, type(source).__name__,
                          **_kv_shape(getattr(source, "config", None),
                                                type(source).__name__.endswith("ForCausalLM")))
    elif parse_size(source) is not None:
        out = _from_count(str(source).strip().upper(), parse_size(source))
    else:
        from ..io.models import model_path

        path = model_path(source)
        if path.is_dir() and (path / "lowbit.json").is_file():
            out = _from_lowbit_dir(path)
        elif path.is_dir():
            out = _from_hf_dir(path)
        elif path.suffix == ".gguf":
            out = _from_gguf(path)
        elif path.suffix == ".safetensors":
            out = _from_safetensors(path)
        else:
            raise ValueError(f"memory: {path} is not a model: give a Hugging Face folder, a .gguf or .safetensors "
                             "file, a built-in name (smollm2-135m, minilm-l6) or a size such as 8B")
        from ..pipeline.experts import unfuse_experts
        unfuse_experts(out.model)  # experts as lowbit.quantize holds them: one Linear per projection per expert
    if isinstance(source, str) and not str(out.source).startswith(source):
        out.source = f"{source} ({out.source})"
    if dtype is not None:
        out.dtype = dtype
    return out


def _kv_shape(config, causal: bool) -> dict:
    """Layers, KV heads and head width of a decoder's attention; empty for an encoder or no config."""
    if config is None or not causal:
        return {}
    heads = config.num_attention_heads
    return {"layers": config.num_hidden_layers, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def _is_causal(config) -> bool:
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def _from_count(name: str, count: float) -> ModelShapes:
    import transformers as tf

    if name in LLAMA_SIZES:
        hidden, layers, heads, kv, inter, vocab, tied = LLAMA_SIZES[name]
        config = tf.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                                tie_word_embeddings=tied, architectures=["LlamaForCausalLM"])
        with META:
            model = tf.LlamaForCausalLM(config)
        return ModelShapes(model, torch.bfloat16, f"{name}: a Llama-shaped config (hidden {hidden}, {layers} layers, "
                           f"{kv} KV heads, vocab {vocab}), bf16", **_kv_shape(config, True))
    n = max(1, round(count / SQUARE**2))
    with META:
        model = nn.Sequential(*[nn.Linear(SQUARE, SQUARE, bias=False) for _ in range(n)])
    return ModelShapes(model, torch.bfloat16, f"{name}: {n} Linear layers of {SQUARE}x{SQUARE} "
                       f"(no shape known for this size: no embeddings, no KV cache), bf16")


def _from_hf_dir(path: Path) -> ModelShapes:
    from ..io.models import _hub_offline, _transformers, read_hf_config

    read_hf_config(path)  # a clear error for a folder that is not a model
    tf = _transformers()
    with _hub_offline():
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    auto = tf.AutoModelForCausalLM if _is_causal(config) else tf.AutoModel
    with META:
        model = auto.from_config(config)
    headers = [safetensors_header(f) for f in sorted(path.glob("*.safetensors"))]
    tensors = {k: v for h in headers for k, v in h.items()}
    return ModelShapes(model, _common_dtype(tensors, path), f"{path.name}: config.json and safetensors headers",
                       checkpoint_params=sum(math.prod(s) for s, _ in tensors.values()) if tensors else None,
                       **_kv_shape(config, _is_causal(config)))


def _from_gguf(path: Path) -> ModelShapes:
    from ..io.gguf.file import parse_gguf
    from ..io.gguf.read import _build, _config

    f = parse_gguf(path)
    config, _ = _config(f)
    with META:
        model = _build(config)
    params = sum(math.prod(t.shape) for t in f.tensors.values())
    return ModelShapes(model, torch.float32, f"{path.name}: GGUF metadata (held in fp32, as lowbit loads it)",
                       checkpoint_params=params, saved=gguf_saved(f), **_kv_shape(config, True))


def _from_lowbit_dir(path: Path) -> ModelShapes:
    """A lowbit checkpoint folder: the architecture from lowbit.json's model config (on the meta device),
    unquantized tensors in the dtype most of its float tensors are stored in."""
    import transformers

    from ..io.lowbit_format import read_meta, weight_files

    meta = read_meta(path)
    info = meta.get("model") or {}
    if not info.get("config"):
        raise ValueError(f"memory: {path} holds a {info.get('class', 'torch')} model without a transformers config; "
                         "give the source model")
    cfg = dict(info["config"])
    try:
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        cls = getattr(transformers, info.get("class", ""), None) or transformers.AutoModelForCausalLM
        with META:
            model = cls(config) if isinstance(cls, type) and issubclass(cls, nn.Module) else cls.from_config(config)
    except Exception as e:  # transformers raises several kinds for a config it cannot build
        raise ValueError(f"{path / 'lowbit.json'}: its model config cannot build a model ({e})") from e
    headers = {k: v for f in weight_files(path) for k, v in safetensors_header(f).items()}
    plain = {k: v for k, v in headers.items() if ".qweight." not in k}
    recipe = (meta.get("recipe") or {}).get("name") or "custom recipe"
    return ModelShapes(model, _common_dtype(plain or headers, path), f"{path.name}: lowbit checkpoint ({recipe}), "
                       "lowbit.json and safetensors headers", saved=_saved_row(model, meta, headers, f"as saved ({recipe})"),
                       **_kv_shape(config, _is_causal(config)))


def _saved_row(model: nn.Module, meta: dict, headers: dict, label: str):
    """The bytes a lowbit checkpoint stores, split as memory's rows are: quantized Linear layers (their
    codes, scales, zeros, bias), embedding tables and the output layer, the rest."""
    nbytes = {k: math.prod(shape) * _ITEMSIZE.get(dt, 4) for k, (shape, dt) in headers.items()}
    modules = meta["modules"]
    tables = {n for n, m in modules.items() if isinstance(m, dict) and m.get("kind") == "embedding"}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    quantized = embedding = other = layer_bytes = layer_weights = 0
    for key, n in nbytes.items():
        owner = key.split(".qweight.")[0] if ".qweight." in key else key.rpartition(".")[0]
        if owner in tables or owner == head_name or "embed" in owner:
            embedding += n
        elif owner in modules:
            quantized += n
            if ".qweight." in key:
                layer_bytes += n
        else:
            other += n
    for name, m in modules.items():
        if name not in tables and name != head_name and isinstance(m, dict) and isinstance(m.get("shape"), list):
            layer_weights += math.prod(m["shape"])
    return saved_parts(label, sum(p.numel() for p in model.parameters()), quantized, embedding, other,
                       layer_bytes, layer_weights)


def saved_parts(label: str, params: int, quantized: int, embedding: int, other: int, layer_bytes: int,
                layer_weights: int) -> dict:
    """A checkpoint's bytes as stored, in the fields of memory.MemoryRow (ModelShapes.saved)."""
    return {"recipe": label, "params": params, "quantized_bytes": quantized, "embedding_bytes": embedding,
            "other_bytes": other,
            "bits_per_weight_layers": 8.0 * layer_bytes / layer_weights if layer_weights else float("nan")}


def gguf_saved(f) -> dict:
    """A parsed .gguf file's own bytes from its tensor table (each tensor's GGML type and shape): what
    llama.cpp holds, not the float model lowbit dequantizes it to. The blocks' 2-D weights are its
    quantized layers; token_embd and output its embedding table and output layer."""
    from ..io.gguf.file import data_nbytes
    from ..io.gguf.mixtures import FILE_TYPES

    quantized = embedding = other = layer_weights = params = 0
    for name, info in f.tensors.items():
        n = data_nbytes(info)
        if n is None:
            raise ValueError(f"{f.path}: tensor {name!r} has a GGML type ({info.type_id}) lowbit has no size for")
        params += math.prod(info.shape)
        if name in ("token_embd.weight", "output.weight"):
            embedding += n
        elif name.startswith("blk.") and len(info.shape) >= 2:
            quantized, layer_weights = quantized + n, layer_weights + math.prod(info.shape)
        else:
            other += n
    ftype = f.meta.get("general.file_type")
    label = next((k for k, t in FILE_TYPES.items() if t.ftype == ftype), "GGUF")
    return saved_parts(f"as saved ({label})", params, quantized, embedding, other, quantized, layer_weights)


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _from_safetensors(path: Path) -> ModelShapes:
    tensors = safetensors_header(path)
    if any(".qweight." in k for k in tensors):  # packed codes and scales, not a model's weights
        where = (f"give its folder, {path.parent}" if (path.parent / "lowbit.json").is_file()
                 else "give the checkpoint folder with its lowbit.json")
        raise ValueError(f"memory: {path} holds a lowbit checkpoint's packed codes and scales, which need the "
                         f"checkpoint's lowbit.json to be read: {where}")
    root = nn.Module()
    for name, (shape, dt) in tensors.items():
        module_name, _, leaf = name.rpartition(".")
        parent = _module_at(root, module_name)
        if leaf == "weight" and len(shape) == 2 and not isinstance(parent, (nn.Linear, nn.Embedding)):
            new = nn.Embedding(*shape, device=META) if "embed" in module_name else \
                nn.Linear(shape[1], shape[0], bias=f"{module_name}.bias" in tensors, device=META)
            _replace(root, module_name, new)
        elif not hasattr(parent, leaf) or getattr(parent, leaf) is None:
            parent.register_parameter(leaf, nn.Parameter(torch.empty(shape, dtype=_DTYPES.get(dt, torch.float32),
                                                                     device=META), requires_grad=False))
    return ModelShapes(root, _common_dtype(tensors, path), f"{path.name}: safetensors header (2-D weights as "
                       "Linear layers)", checkpoint_params=sum(math.prod(s) for s, _ in tensors.values()))


def _module_at(root: nn.Module, name: str) -> nn.Module:
    m = root
    for part in name.split(".") if name else []:
        if not hasattr(m, part):
            m.add_module(part, nn.Module())
        m = getattr(m, part)
    return m


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    holder = _module_at(root, parent)
    old = getattr(holder, leaf, None)
    for k, v in (old.named_children() if isinstance(old, nn.Module) else []):  # children made before it
        new.add_module(k, v)
    setattr(holder, leaf, new)


def safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype string)} from a .safetensors header; no tensor data is read."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100_000_000:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        out = {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (a tensor entry lacks {e})") from e
    if 8 + n + max(ends, default=0) > size:
        raise ValueError(f"{path} is truncated or corrupt: its header places tensor data up to byte "
                         f"{8 + n + max(ends)} but the file has {size} (an interrupted download or copy?)")
    return out


def _common_dtype(tensors: dict, path: Path) -> torch.dtype:
    """The dtype most floating-point elements of the checkpoint are stored in."""
    count: dict[str, int] = {}
    for shape, dt in tensors.values():
        if dt in _DTYPES:
            count[dt] = count.get(dt, 0) + math.prod(shape)
    if not count:
        raise ValueError(f"{path}: no floating-point tensors in the safetensors headers")
    return _DTYPES[max(count, key=count.get)]
