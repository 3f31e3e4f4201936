"""Load Hugging Face folders quantized by other tools (config.json's quantization_config.quant_method:
"compressed-tensors", "gptq", "awq") into a transformers model whose Linear layers are QuantLinear.

    model = lowbit.load("Llama-3.2-1B-GPTQ/")   # weights equal to the producing tool's dequantization

Every tensor is checked: a missing, extra or misshapen tensor, or a corrupt safetensors file, is a
ValueError naming the file and the tensor.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

METHODS = ("compressed-tensors", "gptq", "awq")


def quant_method(path: Path) -> str | None:
    """The quant_method of a Hugging Face folder's config.json (None when it has none)."""
    f = path / "config.json"
    if not f.is_file():
        return None
    q = _read_json(f).get("quantization_config")
    return q.get("quant_method") if isinstance(q, dict) else None


def load_hf_quantized(path: str | Path) -> nn.Module:
    from ..nn import QuantLinear
    from ..pipeline.walk import set_module

    path = Path(path)
    cfg = _read_json(path / "config.json")
    qcfg = cfg.get("quantization_config") or {}
    method = qcfg.get("quant_method")
    if method not in METHODS:
        raise ValueError(f"{path / 'config.json'}: quantization_config.quant_method {method!r} is not read by "
                         f"lowbit; it reads {', '.join(METHODS)}")
    tensors, files = _read_tensors(path)
    model = _skeleton(path)
    layers = dict(model.named_modules())
    quantized = _quantized_modules(method, qcfg, tensors, layers, path)
    for name, build in quantized.items():
        where = f"{files.get(name, path)}: {name}"
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        old = layers[name]
        got = build(local, where)
        q = got.get("qweight")
        shape = tuple(q.shape if q is not None else got["weight"].shape)
        if shape != (old.out_features, old.in_features):
            raise ValueError(f"{where}: weight shape {shape} does not match the model's "
                             f"[{old.out_features}, {old.in_features}] (config.json)")
        bias = local.get("bias")
        if q is None:  # act-order GPTQ: exact float weights in a plain Linear
            new = nn.Linear(old.in_features, old.out_features, bias=bias is not None)
            new.weight.data, new.bias = got["weight"], (nn.Parameter(bias.float()) if bias is not None else None)
            set_module(model, name, new)
            continue
        set_module(model, name, QuantLinear(q, bias, act_scheme=got.get("act_scheme"),
                                            act_scale=got.get("act_scale"), dtype=torch.float32))
    rest = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in quantized}
    _load_rest(model, rest, path, files, set(quantized))
    return model.eval()


def _quantized_modules(method: str, qcfg: dict, tensors: dict, layers: dict, path: Path) -> dict:
    """name -> builder(local tensors, where) -> {"qweight": QTensor, ...}."""
    if method == "compressed-tensors":
        return _ct_modules(qcfg, layers, path)
    from .gptq_awq import awq_qtensor, gptq_weight

    names = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    for n in names:
        if not isinstance(layers.get(n), nn.Linear):
            raise ValueError(f"{path}: tensor {n}.qweight does not belong to a Linear layer of the model")
    bits, group = int(qcfg.get("bits", 4)), int(qcfg.get("group_size", 128))
    if method == "gptq":
        from .gptq_awq import BITS

        if bits not in BITS:
            raise ValueError(f"{path / 'config.json'}: GPTQ bits={bits}: lowbit reads {BITS}-bit GPTQ")
        fmt = qcfg.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"{path / 'config.json'}: GPTQ checkpoint_format {fmt!r}: lowbit reads gptq and gptq_v2")
        def gptq(t, w):
            got = gptq_weight(t, bits, group, fmt == "gptq", w)
            return {"weight": got} if isinstance(got, torch.Tensor) else {"qweight": got}
        return {n: gptq for n in names}
    version = str(qcfg.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or not qcfg.get("zero_point", True):
        raise ValueError(f"{path / 'config.json'}: AWQ bits={bits} version={version!r}: lowbit reads 4-bit GEMM "
                         "checkpoints with zero points")
    return {n: (lambda t, w: {"qweight": awq_qtensor(t, group, w)}) for n in names}


def _ct_modules(qcfg: dict, layers: dict, path: Path) -> dict:
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    from .compressed_tensors import ct_module

    try:
        config = QuantizationConfig.model_validate({k: v for k, v in qcfg.items() if k != "version"})
    except Exception as e:  # pydantic's ValidationError
        raise ValueError(f"{path / 'config.json'}: quantization_config is not a valid compressed-tensors "
                         f"config: {e}") from e
    ignore = config.ignore or []
    out = {}
    for name, m in layers.items():
        if not isinstance(m, nn.Linear):
            continue
        for scheme in config.config_groups.values():
            if scheme.weights is not None and is_match(name, m, scheme.targets, ignore):
                fmt = scheme.format or config.format
                fmt = fmt.value if hasattr(fmt, "value") else fmt
                out[name] = lambda t, w, fmt=fmt, scheme=scheme: ct_module(t, fmt, scheme, w)
                break
    return out


def _read_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{f} is missing or corrupt: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected a JSON object")
    return d


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Every tensor of the folder (model.safetensors or the shards its index names), and which file held
    each module's tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    shards = sorted(set(_read_json(index).get("weight_map", {}).values())) if index.is_file() else ["model.safetensors"]
    tensors, files = {}, {}
    for shard in shards:
        f = path / shard
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{f} is missing or corrupt (truncated download?): {e}") from e
        for k, v in part.items():
            tensors[k] = v
            files[k.rsplit(".", 1)[0]] = f
    return tensors, files


def _skeleton(path: Path) -> nn.Module:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path / 'config.json'}: not a transformers config: {e}") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # lowbit builds the quantized layers itself
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return transformers.AutoModelForCausalLM.from_config(config)


def _load_rest(model: nn.Module, rest: dict, path: Path, files: dict, quantized: set) -> None:
    """The unquantized tensors (embeddings, norms, an unquantized lm_head), each checked for shape."""
    own = model.state_dict()
    for k, v in rest.items():
        if k not in own:
            raise ValueError(f"{files.get(k.rsplit('.', 1)[0], path)}: tensor {k!r} does not belong to the model")
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{files.get(k.rsplit('.', 1)[0], path)}: tensor {k!r} has shape {tuple(v.shape)}, "
                             f"the model expects {tuple(own[k].shape)}")
    missing, _ = model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in rest.items()},
                                       strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and k.rsplit('.', 1)[0] not in quantized and not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing:
        raise ValueError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} in all)")
