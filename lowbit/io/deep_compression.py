"""A Deep Compression model file: one safetensors container, Huffman-coded layers, no pickle.

Each nn.SharedLinear NAME is stored as methods.deep_compression.EncodedLayer's tensors:

    NAME.centroids      fp32  [k]            the shared values
    NAME.index_lengths  uint8 [k]            canonical Huffman code lengths of the cluster indices
    NAME.index_stream   uint8 [bytes]        the cluster index of each kept weight, Huffman-coded
    NAME.gap_lengths    uint8 [2^gap_bits]   code lengths of the relative indices
    NAME.gap_stream     uint8 [bytes]        the relative index of each kept weight (+ fillers)

every other tensor of the state dict as it is (a tensor tied to an earlier one is stored once),
and one JSON entry in the header's metadata ("lowbit_deep_compression": version, model config,
per layer: shape, kept, gap_symbols, gap_bits; tied names). Loading decodes each layer to the
dense weight [C, 0][codes] of its SharedLinear, bit for bit, into a plain nn.Linear.

    size = save_deep_compressed(model, "smollm2.dc.safetensors")   # -> DeepCompressedSize
    model = load_deep_compressed("smollm2.dc.safetensors")          # transformers model from the config
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import write_atomic
from .lowbit_format import _model_meta, _skeleton
from ..methods.deep_compression import EncodedLayer, check_layer, decode_layer, encode_layer
from ..nn import SharedLinear

KEY = "lowbit_deep_compression"
VERSION = 1
_PARTS = ("centroids", "index_lengths", "index_stream", "gap_lengths", "gap_stream")
_DTYPES = {"centroids": torch.float32, "index_lengths": torch.uint8, "index_stream": torch.uint8,
           "gap_lengths": torch.uint8, "gap_stream": torch.uint8}


@dataclass(frozen=True)
class DeepCompressedSize:
    weights: int          # weights of the compressed layers
    layer_bytes: int      # everything stored for them: codebooks, Huffman tables, both streams
    index_bytes: int      # of which the cluster-index streams
    gap_bytes: int        # of which the relative-index streams
    table_bytes: int      # of which codebooks + Huffman code lengths
    file_bytes: int       # the whole file (other tensors and the header included)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.layer_bytes / self.weights

    @property
    def ratio_fp32(self) -> float:
        return 32.0 / self.bits_per_weight


def save_deep_compressed(model: nn.Module, path: str | Path, *, gap_bits: int = 5) -> DeepCompressedSize:
    """Write `model` (its SharedLinear layers Huffman-coded, the rest as is) to one safetensors file."""
    from safetensors.torch import save

    shared = {n: m for n, m in model.named_modules() if isinstance(m, SharedLinear)}
    if not shared:
        raise ValueError(f"save_deep_compressed: {type(model).__name__} has no SharedLinear layer; run "
                         "lowbit.pipeline.deep_compress(model, ...) first")
    tensors, layers, sizes = {}, {}, [0, 0, 0, 0]
    for name, m in shared.items():
        e = encode_layer(m.centroids, m.codes, gap_bits)
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in e.tensors().items()})
        layers[name] = {"shape": list(e.shape), "kept": e.kept, "gap_symbols": e.gap_symbols, "gap_bits": e.gap_bits}
        sizes[0] += e.nbytes
        sizes[1] += e.index_stream.numel()
        sizes[2] += e.gap_stream.numel()
        sizes[3] += e.nbytes - e.index_stream.numel() - e.gap_stream.numel()
    skip = {f"{n}.{k}" for n in shared for k in ("centroids", "codes")}
    seen, tied = {}, {}
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous()
    meta = {"version": VERSION, "model": _model_meta(model), "layers": layers, "tied": tied}
    data = save(tensors, metadata={KEY: json.dumps(meta)})
    write_atomic(Path(path), data)
    return DeepCompressedSize(sum(a * b for a, b in (v["shape"] for v in layers.values())), *sizes, len(data))


def is_deep_compressed(path: str | Path) -> bool:
    """True for a file save_deep_compressed wrote (read from its safetensors header only)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            return KEY in (f.metadata() or {})
    except Exception:  # not a safetensors file at all
        return False


def read_deep_compressed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (state dict with every compressed layer decoded to its dense NAME.weight, the metadata)."""
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), "pt") as f:
            raw = (f.metadata() or {}).get(KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{p}: not a readable safetensors file: {e}") from e
    if raw is None:
        raise ValueError(f"{p}: no {KEY!r} entry in the safetensors metadata: not a Deep Compression file")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: metadata {KEY!r} is not JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("version") != VERSION:
        raise ValueError(f"{p}: Deep Compression version {meta.get('version') if isinstance(meta, dict) else meta!r}; "
                         f"this lowbit reads version {VERSION}")
    state = {}
    for name, info in _field(p, "layers", meta.get("layers"), dict).items():
        e = _encoded(p, name, info, tensors)
        try:
            state[f"{name}.weight"] = decode_layer(e)
        except ValueError as err:
            raise ValueError(f"{p}: layer {name}: {err}") from err
    for key, t in tensors.items():
        if key.rpartition(".")[0] not in meta["layers"] or key.rpartition(".")[2] not in _PARTS:
            state[key] = t
    for key, source in _field(p, "tied", meta.get("tied", {}), dict).items():
        if source not in state:
            raise ValueError(f"{p}: tied tensor {key!r} points at {source!r}, which the file does not hold")
        state[key] = state[source]
    return state, meta


def load_deep_compressed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The model of a Deep Compression file with plain nn.Linear layers holding the decoded shared
    weights; built from the saved transformers config, or loaded into `model` (same architecture;
    its SharedLinear layers, if any, are replaced)."""
    p = Path(path)
    state, meta = read_deep_compressed(p)
    if model is None:
        model = _skeleton({"model": meta.get("model") or {}}, p, sum(t.numel() * t.element_size() for t in state.values()),
                          len(state))
    for name, info in meta["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"{p}: layer {name!r} is not a module of {type(model).__name__}") from e
        out_f, in_f = info["shape"]
        lin = nn.Linear(in_f, out_f, bias=getattr(old, "bias", None) is not None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{p}: tensors do not match {type(model).__name__}: {e}") from e
    return model.eval()


def _field(p: Path, name: str, value, kind):
    if not isinstance(value, kind):
        raise ValueError(f"{p}: metadata field {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _encoded(p: Path, name: str, info, tensors: dict) -> EncodedLayer:
    _field(p, f"layers.{name}", info, dict)
    parts = {}
    for k in _PARTS:
        t = tensors.get(f"{name}.{k}")
        if t is None or t.dtype != _DTYPES[k] or t.dim() != 1:
            raise ValueError(f"{p}: tensor {name}.{k} is missing or not a 1-D {_DTYPES[k]}")
        parts[k] = t
    shape = info.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"{p}: layers.{name}.shape must be [out, in] positive integers, got {shape!r}")
    ints = {k: info.get(k) for k in ("kept", "gap_symbols", "gap_bits")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints.values()):
        raise ValueError(f"{p}: layers.{name} needs integer kept, gap_symbols, gap_bits; got {str(ints)[:200]}")
    e = EncodedLayer(tuple(shape), **parts, **ints)
    try:  # before any count sizes an allocation
        check_layer(e)
    except ValueError as err:
        raise ValueError(f"{p}: layer {name}: {err}") from err
    return e
