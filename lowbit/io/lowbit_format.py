"""lowbit's own checkpoint: safetensors (packed codes, scales, zeros, every
other tensor) plus lowbit.json (format version, recipe, model config, one
entry per quantized module). Loading needs no full-precision weights.

Writes are atomic: everything goes to a temporary folder beside the target,
which is renamed into place last, so an interrupted save leaves no folder
that loads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..core import QTensor, Scheme

FORMAT = "lowbit"
VERSION = 1
META = "lowbit.json"
WEIGHTS = "model.safetensors"
_PARTS = ("codes", "zeros", "tensor_scale", "codebook", "offset")


# -- QTensor <-> flat tensors ---------------------------------------------------
def qtensor_to_tensors(q: QTensor, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {f"{prefix}.{k}": getattr(q, k) for k in _PARTS if getattr(q, k) is not None}
    meta = {"shape": list(q.shape), "scheme": q.scheme.to_dict()}
    if isinstance(q.scales, QTensor):
        inner, meta["scales"] = qtensor_to_tensors(q.scales, f"{prefix}.scales")
        tensors.update(inner)
    elif q.scales is not None:
        tensors[f"{prefix}.scales"] = q.scales
    return tensors, meta


def qtensor_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, meta: dict, where: str) -> QTensor:
    def take(key, required=False):
        full = f"{prefix}.{key}"
        if full not in tensors:
            if required:
                raise ValueError(f"{where}: tensor {full!r} is missing")
            return None
        return tensors[full]

    scheme = Scheme.from_dict(meta["scheme"])
    scales = (qtensor_from_tensors(tensors, f"{prefix}.scales", meta["scales"], where) if "scales" in meta
              else take("scales", required=not scheme.is_learned))
    q = QTensor(take("codes", required=True), tuple(meta["shape"]), scheme, scales=scales, zeros=take("zeros"),
                tensor_scale=take("tensor_scale"), codebook=take("codebook"), offset=take("offset"))
    expected = -(-q.numel * scheme.bits // 8)
    if q.codes.numel() != expected:
        raise ValueError(f"{where}: {prefix}.codes has {q.codes.numel()} bytes, expected {expected} for shape "
                         f"{q.shape} at {scheme.bits} bits")
    return q


# -- save ---------------------------------------------------------------------
def save_lowbit(model: nn.Module, path: str | Path, tokenizer=None, source: str | None = None) -> Path:
    """Write `model` (quantized in place by lowbit.quantize) to folder `path`, atomically."""
    from safetensors.torch import save_file

    from ..nn import LLMInt8Linear, QuantEmbedding, QuantLinear

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    owners = {}  # id(QTensor) -> the module name it is stored under (tied embeddings: stored once)
    for name, m in model.named_modules():
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
        if t.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device: materialise the model before saving")
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:  # tied weights (e.g. lm_head = embed_tokens) are stored once
            continue
        seen.add(ptr)
        tensors[key] = t
    meta = {"format": FORMAT, "version": VERSION, "modules": modules,
            "recipe": model.lowbit_recipe.to_dict() if hasattr(model, "lowbit_recipe") else None,
            "model": _model_meta(model), "source": source}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / META).write_text(json.dumps(meta, indent=1))  # written last: its presence marks a whole save
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _model_meta(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {"class": type(model).__name__, "config": None}
    return {"class": type(model).__name__, "config": config.to_dict()}


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        if not (path / META).exists() and any(path.iterdir()):
            raise ValueError(f"{path} exists and is not a lowbit checkpoint: refusing to overwrite it")
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


# -- load ---------------------------------------------------------------------
def read_meta(path: str | Path) -> dict:
    path = Path(path)
    f = path / META
    if not f.is_file():
        raise ValueError(f"{path} is not a lowbit checkpoint: {META} is missing (an interrupted save?)")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is corrupt: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{f}: lowbit format version {meta.get('version')!r} is not supported "
                         f"(this lowbit reads version {VERSION}); upgrade lowbit")
    return meta


def load_lowbit(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a quantized model from folder `path`. Transformers models are rebuilt from the
    saved config; any other model needs `model`, an instance of the same architecture."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..nn import LLMInt8Linear, QuantEmbedding, QuantLinear
    from ..pipeline.recipe import Recipe
    from ..pipeline.walk import set_module

    path = Path(path)
    meta = read_meta(path)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path / WEIGHTS} is missing or corrupt: {e}") from e
    if model is None:
        model = _skeleton(meta, path)
    qtensors = {}  # module name -> its QTensor, for modules tied to it
    for name, m in sorted(meta["modules"].items(), key=lambda item: "tied_to" in item[1]):
        q = _module_qtensor(tensors, name, m, qtensors, str(path / WEIGHTS))
        qtensors[name] = q
        act = Scheme.from_dict(m["act_scheme"]) if m.get("act_scheme") else None
        bias = tensors.get(f"{name}.bias")
        kw = {"threshold": m["outlier_threshold"]} if m.get("outlier_threshold") is not None else {}
        if m.get("kind") == "embedding":
            new = QuantEmbedding(q, m.get("padding_idx"), dtype=getattr(torch, m.get("dtype", "float32")))
        else:
            new = (LLMInt8Linear if kw else QuantLinear)(
                q, bias, act_scheme=act, act_scale=tensors.get(f"{name}.act_scale"),
                act_zero=tensors.get(f"{name}.act_zero"), dtype=getattr(torch, m.get("dtype", "float32")), **kw)
        try:
            set_module(model, name, new)
        except AttributeError as e:
            raise ValueError(f"{path}: the model has no module {name!r} to replace") from e
    rest = {k: v for k, v in tensors.items() if not _belongs_to(k, meta["modules"])}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if hasattr(model, "tie_weights") and not any(isinstance(m, QuantEmbedding) for m in model.modules()):
        model.tie_weights()  # (a quantized table and its tied head already share one QTensor)
    missing = [k for k in missing if not _belongs_to(k, meta["modules"]) and not _is_tied(model, k)]
    if missing:
        raise ValueError(f"{path / WEIGHTS}: tensor {missing[0]!r} is missing ({len(missing)} in all)")
    if unexpected:
        raise ValueError(f"{path / WEIGHTS}: tensor {unexpected[0]!r} does not belong to the model")
    if meta.get("recipe"):
        model.lowbit_recipe = Recipe.from_dict(meta["recipe"])
    return model.eval()


def _module_qtensor(tensors: dict, name: str, m: dict, loaded: dict, where: str) -> QTensor:
    """The QTensor of module `name`: its own tensors, or the one of the module it is tied to."""
    tied = m.get("tied_to")
    if tied is None:
        return qtensor_from_tensors(tensors, f"{name}.qweight", m, where)
    if tied not in loaded:
        raise ValueError(f"{where}: module {name!r} is tied to {tied!r}, which holds no quantized tensor")
    return loaded[tied]


def _belongs_to(key: str, modules: dict) -> bool:
    return any(key.startswith(f"{n}.qweight") or key in (f"{n}.bias", f"{n}.act_scale", f"{n}.act_zero")
               for n in modules)


def _is_tied(model: nn.Module, key: str) -> bool:
    keys = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(keys, dict):
        keys = list(keys)
    return key in keys


def _skeleton(meta: dict, path: Path) -> nn.Module:
    info = meta.get("model") or {}
    if not info.get("config"):
        raise ValueError(f"{path} holds a {info.get('class', 'torch')} model without a transformers config: "
                         "pass model=<an instance of the same architecture> to lowbit.load")
    import transformers

    cfg = dict(info["config"])
    cls = getattr(transformers, info["class"], None)
    if cls is None:
        raise ValueError(f"{path}: model class {info['class']!r} is not in transformers")
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    try:  # skip random initialisation: every weight is about to be replaced
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return cls(config)
