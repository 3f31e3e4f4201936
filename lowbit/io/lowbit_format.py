"""lowbit's own checkpoint: safetensors (packed codes, scales, zeros, every
other tensor) plus lowbit.json (format version, recipe, model config, one
entry per quantized module). Loading needs no full-precision weights.

Writes are atomic (atomic.py): everything goes to a temporary folder beside the
target, fsynced, then renamed into place, so an interrupted save leaves either
the previous checkpoint or the new one. Reads check every field of lowbit.json
and every tensor's dtype and shape (lowbit_checks.py) before using them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from . import atomic, checks
from . import lowbit_checks as check
from ..core import QTensor, pack_bits_le
from ..core.trits import pack_trits_tq1, tq1_nbytes, unpack_trits_tq1

FORMAT = "lowbit"
VERSION = 1
META = "lowbit.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # sharded checkpoints (io/streaming/), as Hugging Face names it
TQ1_LAYOUT = "tq1_0"  # ternary codes in llama.cpp TQ1_0's base-3 block layout (core/trits.py)
_PARTS = ("codes", "zeros", "tensor_scale", "codebook", "offset")


# -- QTensor <-> flat tensors ---------------------------------------------------
def qtensor_to_tensors(q: QTensor, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {f"{prefix}.{k}": getattr(q, k) for k in _PARTS if getattr(q, k) is not None}
    meta = {"shape": list(q.shape), "scheme": q.scheme.to_dict()}
    if q.scheme.format == "ternary":  # 5 trits per byte on disk (1.625 bits) instead of 2 bits in memory
        tensors[f"{prefix}.codes"] = pack_trits_tq1(q.unpack_codes())
        meta["codes_layout"] = TQ1_LAYOUT
    if isinstance(q.scales, QTensor):
        inner, meta["scales"] = qtensor_to_tensors(q.scales, f"{prefix}.scales")
        tensors.update(inner)
    elif q.scales is not None:
        tensors[f"{prefix}.scales"] = q.scales
    return tensors, meta


def qtensor_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, meta: dict, where: str,
                        json_where: str | None = None, field: str = "") -> QTensor:
    """Rebuild the QTensor saved under `prefix`; `where` names the tensors' file, `json_where`
    and `field` the lowbit.json entry `meta` came from (for errors)."""
    jw = json_where or where

    def take(key, required=False):
        full = f"{prefix}.{key}"
        if full not in tensors:
            if required:
                raise ValueError(f"{where}: tensor {full!r} is missing")
            return None
        return tensors[full]

    check.field(jw, field or prefix, meta, dict)
    scheme = check.scheme(jw, f"{field}.scheme", meta.get("scheme"))
    shape = check.shape(jw, f"{field}.shape", meta.get("shape"))
    scales = (qtensor_from_tensors(tensors, f"{prefix}.scales", meta["scales"], where, jw, f"{field}.scales")
              if "scales" in meta else take("scales", required=not scheme.is_learned))
    codes = take("codes", required=True)
    layout = meta.get("codes_layout")
    if layout is not None:
        if layout != TQ1_LAYOUT or scheme.format != "ternary":
            raise ValueError(f"{jw}: {field or prefix}.codes_layout is {layout!r}: lowbit reads {TQ1_LAYOUT!r} "
                             "for ternary codes only")
        n = math.prod(shape)
        if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != tq1_nbytes(n):
            raise ValueError(f"{where}: tensor {prefix}.codes holds {codes.dtype} {tuple(codes.shape)}; {n} trits "
                             f"in the {TQ1_LAYOUT} layout take uint8 ({tq1_nbytes(n)},)")
        trits = unpack_trits_tq1(codes, n)
        if int(trits.max()) > 2:
            raise ValueError(f"{where}: tensor {prefix}.codes decodes to a trit above 2: corrupt base-3 bytes")
        codes = pack_bits_le(trits, scheme.bits)
    q = QTensor(codes, shape, scheme, scales=scales, zeros=take("zeros"),
                tensor_scale=take("tensor_scale"), codebook=take("codebook"), offset=take("offset"))
    check.qtensor_parts(where, prefix, q)
    return q


# -- save ---------------------------------------------------------------------
def save_lowbit(model: nn.Module, path: str | Path, tokenizer=None, source: str | None = None) -> Path:
    """Write `model` (quantized in place by lowbit.quantize) to folder `path`, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, modules = model_entries(model, {})
    meta = checkpoint_meta(model, modules, source)
    atomic.recover(path, _is_whole)
    if path.exists() and not (path.is_dir() and (_is_whole(path) or not any(path.iterdir()))):
        raise ValueError(f"{path} exists and is not a lowbit checkpoint: refusing to overwrite it")
    with atomic.staged_dir(path, _is_whole) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / META).write_text(json.dumps(meta, indent=1))  # written last: its presence marks a whole save
    return path


def checkpoint_meta(model: nn.Module, modules: dict, source: str | None) -> dict:
    """lowbit.json's content for `model` and its quantized modules' entries."""
    return {"format": FORMAT, "version": VERSION, "modules": modules,
            "recipe": model.lowbit_recipe.to_dict() if hasattr(model, "lowbit_recipe") else None,
            "model": _model_meta(model), "source": source,
            # where the calibration text lay (set by `lowbit quantize`), so `lowbit eval` can avoid it
            "calibration_text": getattr(model, "lowbit_calibration_text", None)}


def model_entries(model: nn.Module, owners: dict, under: "tuple[str, ...] | None" = None
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (every tensor to store, lowbit.json's entry per quantized module), for the whole model or
    only the modules `under` these names (io/streaming/ writes a model a part at a time).
    `owners`: id(QTensor) -> the module it is stored under, kept across parts (tied weights
    are stored once)."""
    from ..nn import LLMInt8Linear, QuantEmbedding, QuantLinear

    def inside(name: str) -> bool:
        return under is None or any(name == u or name.startswith(u + ".") for u in under)

    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for name, m in model.named_modules():
        if not inside(name):
            continue
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            if id(m.qweight) in owners:
                meta = {"tied_to": owners[id(m.qweight)]}
            else:
                owners[id(m.qweight)] = name
                t, meta = qtensor_to_tensors(m.qweight, f"{name}.qweight")
                tensors.update(t)
            meta["dtype"] = str(m.dtype).removeprefix("torch.")
            if isinstance(m, QuantEmbedding):
                meta["kind"], meta["padding_idx"] = "embedding", m.padding_idx
            else:
                meta["act_scheme"] = m.act_scheme.to_dict() if m.act_scheme else None
            if isinstance(m, LLMInt8Linear):
                meta["outlier_threshold"] = m.threshold
            modules[name] = meta
    seen = set()
    for key, t in model.state_dict().items():
        if not inside(key.rpartition(".")[0]):
            continue
        if t.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device: materialise the model before saving")
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:  # tied weights (e.g. lm_head = embed_tokens) are stored once
            continue
        seen.add(ptr)
        tensors[key] = t
    return tensors, modules


def weight_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json lists (io/streaming/)."""
    index = path / INDEX
    if not index.is_file():
        return [path / WEIGHTS]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is corrupt: {e}") from e
    return [checks.name_in(path, n, index, "a shard name in weight_map") for n in files]


def _is_whole(folder: Path) -> bool:
    """A folder a save finished writing (lowbit.json is written last)."""
    return (folder / META).is_file()


def _model_meta(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {"class": type(model).__name__, "config": None}
    return {"class": type(model).__name__, "config": config.to_dict()}


# -- load ---------------------------------------------------------------------
def read_meta(path: str | Path) -> dict:
    """lowbit.json of checkpoint folder `path`, its top-level fields checked (the module entries
    are checked as they are read). Puts back a checkpoint an interrupted save left aside."""
    path = Path(path)
    atomic.recover(path, _is_whole)
    f = path / META
    if not f.is_file():
        raise ValueError(f"{path} is not a lowbit checkpoint: {META} is missing (an interrupted save?)")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is corrupt: {e}") from e
    except RecursionError as e:  # deeply nested brackets
        raise ValueError(f"{f} is corrupt: nested too deeply") from e
    check.field(f, "(top level)", meta, dict)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{f}: lowbit format version {meta.get('version')!r} is not supported "
                         f"(this lowbit reads version {VERSION}); upgrade lowbit")
    check.field(f, "modules", meta.get("modules"), dict)
    check.field(f, "recipe", meta.get("recipe"), dict, allow_none=True)
    check.field(f, "model", meta.get("model"), dict, allow_none=True)
    check.field(f, "source", meta.get("source"), str, allow_none=True)
    return meta


def load_lowbit(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a quantized model from folder `path`. Transformers models are rebuilt from the
    saved config; any other model needs `model`, an instance of the same architecture."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..nn import QuantEmbedding
    from ..pipeline.recipe import Recipe
    from ..pipeline.walk import set_module

    path = Path(path)
    meta = read_meta(path)
    f = path / META
    tensors = {}
    for shard in weight_files(path):
        try:
            tensors.update(load_file(str(shard)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{shard} is missing or corrupt: {e}") from e
    if model is None:
        model = _skeleton(meta, path, sum(t.numel() * t.element_size() for t in tensors.values()),
                          len(tensors) + len(meta["modules"]))
    if any(".experts." in name for name in meta["modules"]):  # quantized experts are one Linear each
        from ..pipeline.experts import unfuse_experts
        unfuse_experts(model)
    loaded = {}  # module name -> its QTensor, for the modules tied to it
    for name, m in sorted(meta["modules"].items(), key=lambda item: isinstance(item[1], dict) and "tied_to" in item[1]):
        new = _quant_module(tensors, name, m, model, path, loaded)
        loaded[name] = new.qweight
        set_module(model, name, new)
    rest = {k: v for k, v in tensors.items() if not _belongs_to(k, meta["modules"])}
    try:
        missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise ValueError(f"{path / WEIGHTS} does not fit the model: {e}") from e
    if hasattr(model, "tie_weights") and not any(isinstance(m, QuantEmbedding) for m in model.modules()):
        model.tie_weights()  # (a quantized table and its tied head already share one QTensor)
    missing = [k for k in missing if not _belongs_to(k, meta["modules"]) and not _is_tied(model, k)]
    if missing:
        raise ValueError(f"{path / WEIGHTS}: tensor {missing[0]!r} is missing ({len(missing)} in all)")
    if unexpected:
        raise ValueError(f"{path / WEIGHTS}: tensor {unexpected[0]!r} does not belong to the model")
    if meta.get("recipe"):
        try:
            model.lowbit_recipe = Recipe.from_dict(meta["recipe"])
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise ValueError(f"{f}: field recipe is not a valid recipe: {e}") from e
    return model.eval()


def _quant_module(tensors: dict, name: str, m, model: nn.Module, path: Path, loaded: dict) -> nn.Module:
    """The QuantLinear, BitLinear, LLMInt8Linear or QuantEmbedding that lowbit.json's modules[name]
    describes; `loaded` holds the QTensors of modules already built, for a module tied to one of them."""
    from ..methods.bitnet import is_bitnet
    from ..nn import BitLinear, LLMInt8Linear, QuantEmbedding, QuantLinear

    f, at = path / META, f"modules[{name!r}]"
    check.field(f, at, m, dict)
    if not name or not all(part.isidentifier() or part.isdigit() for part in name.split(".")):
        raise ValueError(f"{f}: {at} is not a module name")
    try:
        target = model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"{f}: {at}: the model built from the config has no module {name!r}") from e
    if m.get("tied_to") is None:  # a tied module borrows a tensor checked already
        shape = check.shape(f, f"{at}.shape", m.get("shape"))
        if shape != _weight_shape(target):  # checked before the tensors: the likelier mistake
            raise ValueError(f"{f}: {at}.shape is {list(shape)} but the model's {name} is a "
                             f"{type(target).__name__} with weight [out, in] = {list(_weight_shape(target) or [])}")
    q = _module_qtensor(tensors, name, m, loaded, path)
    if tuple(q.shape) != _weight_shape(target):
        raise ValueError(f"{f}: {at} is tied to a tensor of shape {list(q.shape)}, but the model's {name} is a "
                         f"{type(target).__name__} with weight [out, in] = {list(_weight_shape(target) or [])}")
    dtype = check.dtype(f, f"{at}.dtype", m.get("dtype", "float32"))
    if m.get("kind") == "embedding":
        padding = check.field(f, f"{at}.padding_idx", m.get("padding_idx"), int, allow_none=True)
        return QuantEmbedding(q, padding, dtype=dtype)
    act = check.scheme(f, f"{at}.act_scheme", m["act_scheme"]) if m.get("act_scheme") is not None else None
    threshold = check.field(f, f"{at}.outlier_threshold", m.get("outlier_threshold"), (int, float), allow_none=True)
    bias = tensors.get(f"{name}.bias")
    if bias is not None:
        check.tensor(path / WEIGHTS, f"{name}.bias", bias, (q.shape[0],), tuple(check.DTYPES.values()))
    kw = {"threshold": threshold} if threshold is not None else {}
    # BitNet b1.58 (ternary absmean per tensor, int8 per token) runs its own forward, as lowbit.quantize builds it
    cls = LLMInt8Linear if kw else BitLinear if is_bitnet(q.scheme, act) else QuantLinear
    try:
        return cls(
            q, bias, act_scheme=act, act_scale=tensors.get(f"{name}.act_scale"),
            act_zero=tensors.get(f"{name}.act_zero"), dtype=dtype, **kw)
    except ValueError as e:
        raise ValueError(f"{f}: {at}: {e}") from e


def _module_qtensor(tensors: dict, name: str, m: dict, loaded: dict, path: Path) -> QTensor:
    """The QTensor of module `name`: its own tensors, or the one of the module it is tied to."""
    f, at = path / META, f"modules[{name!r}]"
    tied = check.field(f, f"{at}.tied_to", m.get("tied_to"), str, allow_none=True)
    if tied is None:
        return qtensor_from_tensors(tensors, f"{name}.qweight", m, str(path / WEIGHTS), str(f), at)
    if tied not in loaded:
        raise ValueError(f"{f}: {at} is tied to {tied!r}, which holds no quantized tensor")
    return loaded[tied]


def _weight_shape(m: nn.Module) -> tuple[int, ...] | None:
    """[out, in] of the layer a quantized module replaces (None: it has no 2-D weight)."""
    from ..nn import QuantEmbedding, QuantLinear
    from ..pipeline.walk import linear_weight

    if isinstance(m, (QuantLinear, QuantEmbedding)):
        return tuple(m.qweight.shape)
    w = getattr(m, "weight", None)
    return tuple(linear_weight(m).shape) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def _belongs_to(key: str, modules: dict) -> bool:
    return any(key.startswith(f"{n}.qweight") or key in (f"{n}.bias", f"{n}.act_scale", f"{n}.act_zero")
               for n in modules)


def _is_tied(model: nn.Module, key: str) -> bool:
    keys = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(keys, dict):
        keys = list(keys)
    return key in keys


# The model a config describes may take at most this many times the bytes of the tensors it is
# built from (a 1-bit code becomes a float32 parameter until its module is replaced), plus room
# for buffers computed from the config (rotary tables): a few bytes of JSON cannot ask for gigabytes.
MAX_EXPANSION, SLACK_BYTES = 32, 64 << 20
# config fields that count modules built in a loop: each such module holds at least one tensor
_COUNTS = ("num_hidden_layers", "num_local_experts", "num_experts", "n_routed_experts")


def _skeleton(meta: dict, path: Path, file_bytes: int, file_tensors: int) -> nn.Module:
    """The transformers model of meta["model"] (class and config), uninitialised, once its size is
    checked against the `file_bytes` of tensors (`file_tensors` of them) it is to be loaded from:
    the config's counts first, then the whole model built on the meta device (no memory)."""
    info = meta.get("model") or {}
    if not info.get("config"):
        raise ValueError(f"{path} holds a {info.get('class', 'torch')} model without a transformers config: "
                         "pass model=<an instance of the same architecture> to lowbit.load")
    import transformers

    f = path / META
    cfg = dict(check.field(f, "model.config", info["config"], dict))
    cls = check.model_class(f, info.get("class"))
    model_type = check.field(f, "model.config.model_type", cfg.pop("model_type", None), str)
    try:
        config = transformers.AutoConfig.for_model(model_type, **cfg)
    except Exception as e:  # transformers validates config fields with several exception kinds
        raise ValueError(f"{f}: field model.config is not a valid {model_type!r} config: {e}") from e
    if not isinstance(config, cls.config_class):
        raise ValueError(f"{f}: field model.class {cls.__name__} does not take a {model_type!r} config")
    for name in _COUNTS:
        n = getattr(config, name, None)
        if isinstance(n, int) and n > file_tensors:
            raise ValueError(f"{f}: field model.config.{name} is {n}, but the checkpoint holds {file_tensors} "
                             "tensors in all")
    try:  # skip random initialisation: every weight is about to be replaced
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    def build():
        with no_init_weights():
            return cls(config)
    # as above: any field value can reach the model's constructor
    need = checks.model_bytes(checks.on_meta(build, f, f"field model.config cannot build a {cls.__name__}"))
    if need > MAX_EXPANSION * file_bytes + SLACK_BYTES:
        raise ValueError(f"{f}: field model.config describes a {cls.__name__} of {need:,} bytes, more than "
                         f"{MAX_EXPANSION} times the {file_bytes:,} bytes of tensors the checkpoint holds "
                         "(a corrupt or foreign config?)")
    try:
        return build()
    except Exception as e:
        raise ValueError(f"{f}: field model.config cannot build a {cls.__name__}: {e}") from e
