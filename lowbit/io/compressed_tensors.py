"""compressed-tensors checkpoints: the Hugging Face folder layout (quant_method
"compressed-tensors") that transformers and vLLM read, written from and read into QuantLinear.

Per quantized Linear `name`, the tensors each format stores (shapes for a weight [out, in]):

    pack-quantized   int weight-only, 2/4/8 bits
        name.weight_packed      int32 [out, ceil(in * bits / 32)]  codes q + 2^(bits-1), bit stream
                                of each row LSB first in little-endian words (rows padded to 32 codes)
        name.weight_scale       [out, in / group] (group), [out, 1] (channel), [1] (tensor)
        name.weight_zero_point  int32 [ceil(out * bits / 32), in / group], packed down the columns
                                (affine only; an integer on the signed grid)
        name.weight_shape       int64 [2]
    int-quantized    int8 weights with int8 activations: name.weight int8 [out, in], weight_scale,
                     and name.input_scale [1] when the activations are static
    float-quantized  fp8_e4m3 weights: name.weight float8_e4m3fn [out, in], weight_scale; with fp8
                     activations per token, dynamic (FP8_DYNAMIC), nothing more is stored
    nvfp4-pack-quantized
        name.weight_packed      uint8 [out, in / 2], two E2M1 codes a byte, low nibble first
        name.weight_scale       float8_e4m3fn [out, in / 16]
        name.weight_global_scale float32 [1]: the reciprocal of lowbit's tensor scale

Dequantization in the readers:  w = (q - zero_point) * scale  (int),  w = q * scale  (fp8),
w = fp4 * (scale / global_scale)  (nvfp4). lowbit's affine codes u on [0, 2^b - 1] with an
integer zero point z are q = u - 2^(b-1), zero_point = z - 2^(b-1): the same (u - z) * s.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..core import QTensor
from ..core.granularity import PerBlock, PerChannel, PerGroup, PerTensor, PerToken
from ..core.packing import pack_bits_le
from .atomic import staged_dir
from .gptq_awq import sign_bits

QUANT_METHOD = "compressed-tensors"
WEIGHTS = "model.safetensors"
PACK_BITS = (2, 4, 8)  # widths that divide 32: every compressed-tensors and vLLM version packs them alike
_SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# -- scheme mapping -------------------------------------------------------------
def ct_scheme(q: QTensor, act_scheme=None, act_scale=None, act_zero=None, where: str = "") -> tuple[str, dict]:
    """lowbit weight (and activation) scheme -> (compressed-tensors format, QuantizationScheme fields
    as a dict). Raises ValueError naming `where` when the format has no exact layout for it."""
    s = q.scheme
    fmt = s.fmt if not s.is_learned else None

    def refuse(why: str):
        return ValueError(f"{where}: {s.name or s.format} weights: {why}")

    if s.is_learned or fmt.kind == "codebook" or s.double_quant is not None:
        raise refuse("compressed-tensors has no layout for codebook or double-quantized weights; "
                     "save with format='lowbit', or quantize with an int, fp8 or nvfp4 recipe")
    if len(q.shape) != 2:
        raise refuse(f"needs a 2-D weight, got shape {q.shape}")
    if s.name == "nvfp4" or (s.format == "fp4_e2m1" and s.tensor_scale):
        if s.granularity != PerGroup(16) or s.scale_format != "fp8_e4m3" or not s.tensor_scale:
            raise refuse("NVFP4 in compressed-tensors is fp4_e2m1 in groups of 16 with fp8_e4m3 scales "
                         "and a tensor scale (lowbit's 'nvfp4' scheme)")
        if q.shape[1] % 16:
            raise refuse(f"NVFP4 needs in_features divisible by 16, got {q.shape[1]}")
        if act_scheme is not None:  # W4A4 needs fp4 activations in groups of 16 and a calibrated global scale
            raise refuse("NVFP4 is exported with unquantized activations (NVFP4A16): lowbit has no fp4 "
                         "activation scheme for compressed-tensors' NVFP4 (W4A4) preset")
        weights = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
                   "group_size": 16, "dynamic": False}
        return "nvfp4-pack-quantized", {"weights": weights, "input_activations": None}
    if s.tensor_scale:
        raise refuse("a tensor scale is only stored for NVFP4")
    if fmt.kind == "float":
        if s.format != "fp8_e4m3" or s.scale_format not in _SCALE_DTYPES:
            raise refuse("compressed-tensors stores float weights as fp8_e4m3 with fp32/fp16/bf16 scales "
                         "(and nvfp4); use the 'fp8' recipe")
        weights = {"num_bits": 8, "type": "float", "symmetric": True, **_strategy(q, refuse)}
        return "float-quantized", _with_acts(weights, act_scheme, act_scale, act_zero, refuse)
    if fmt.kind != "int" or getattr(fmt, "step", 1.0) != 1.0:
        raise refuse("compressed-tensors stores integer (int/uint), fp8 and nvfp4 weights only")
    if s.scale_format not in _SCALE_DTYPES:
        raise refuse(f"integer weights need fp32, fp16 or bf16 scales, not {s.scale_format}")
    if not s.symmetric and not s.integer_zero:
        raise refuse("compressed-tensors stores affine zero points as integers, and these zero points are "
                     "real numbers; quantize with integer_zero=True (GPTQ/AWQ style) or a symmetric recipe "
                     "such as w4g64-sym")
    if s.symmetric and not fmt.is_signed:
        raise refuse("symmetric unsigned integers have no compressed-tensors layout")
    weights = {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric, **_strategy(q, refuse)}
    if act_scheme is not None:
        if s.bits != 8 or not s.symmetric:
            raise refuse("quantized activations are exported with symmetric int8 weights (W8A8) only")
        return "int-quantized", _with_acts(weights, act_scheme, act_scale, act_zero, refuse)
    if weights["strategy"] not in ("group", "channel"):
        raise refuse("pack-quantized weights are written in groups along the input or per output channel")
    if s.bits not in PACK_BITS:
        raise refuse(f"pack-quantized is written for {PACK_BITS} bits, not {s.bits}: other widths are packed "
                     "differently by older compressed-tensors and vLLM releases")
    return "pack-quantized", {"weights": weights, "input_activations": None}


def _strategy(q: QTensor, refuse) -> dict:
    g, (_, cols) = q.scheme.granularity, q.shape
    if isinstance(g, PerGroup) and g.axis % 2 == 1:
        if cols % g.size:
            raise refuse(f"group size {g.size} does not divide in_features {cols} (compressed-tensors "
                         "has no ragged last group)")
        return {"strategy": "group", "group_size": g.size}
    if isinstance(g, PerChannel) and g.axis % 2 == 0:
        return {"strategy": "channel"}
    if isinstance(g, PerTensor):
        return {"strategy": "tensor"}
    if isinstance(g, PerBlock) and q.scheme.fmt.kind == "float":
        return {"strategy": "block", "block_structure": [g.rows, g.cols]}
    raise refuse(f"granularity {g} has no compressed-tensors strategy (groups along the input, "
                 "one scale per output channel, per tensor, or fp8 blocks)")


def _with_acts(weights: dict, act, act_scale, act_zero, refuse) -> dict:
    scheme = {"weights": weights, "input_activations": None}
    if act is None:
        return scheme
    if weights["type"] == "float":  # llm-compressor's FP8_DYNAMIC: fp8 weights, fp8 activations per token
        if act.format != "fp8_e4m3" or not isinstance(act.granularity, PerToken) or act_scale is not None:
            raise refuse(f"activations {act.format}/{type(act.granularity).__name__}: fp8 weights are exported "
                         "with fp8_e4m3 activations per token, dynamic (the 'fp8-dynamic' recipe)")
        scheme["input_activations"] = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                       "dynamic": True}
        return scheme
    if act.format != "int8" or not act.symmetric or act_zero is not None:
        raise refuse(f"activations {act.format} ({'symmetric' if act.symmetric else 'affine'}): int8 weights "
                     "are exported with symmetric int8 activations only")
    if isinstance(act.granularity, PerToken) and act_scale is None:
        scheme["input_activations"] = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                       "dynamic": True}
    elif isinstance(act.granularity, PerTensor) and act_scale is not None and act_scale.numel() == 1:
        scheme["input_activations"] = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                                       "dynamic": False}
    else:
        raise refuse("activations are exported dynamic per token or static per tensor")
    return scheme


# -- tensors --------------------------------------------------------------------
def pack_int32_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes u: uint8 [rows, cols] -> int32 [rows, ceil(cols * bits / 32)], each row a bit
    stream LSB first (code j at bits j*bits..) in little-endian 32-bit words, rows padded to 32 codes."""
    rows, cols = u.shape
    padded = math.ceil(cols / 32) * 32
    u = torch.nn.functional.pad(u, (0, padded - cols)) if padded > cols else u
    words = pack_bits_le(u.contiguous(), bits).view(rows, padded * bits // 8)
    n = math.ceil(cols * bits / 32)
    return words[:, : 4 * n].contiguous().view(torch.int32)


def weight_tensors(q: QTensor, fmt: str) -> dict[str, torch.Tensor]:
    """One QuantLinear's weight in the compressed-tensors layout `fmt` (local names)."""
    s = q.scheme
    rows, cols = q.shape
    if fmt == "nvfp4-pack-quantized":
        return {"weight_packed": q.codes.view(rows, cols // 2).clone(),
                "weight_scale": q.scales.view(torch.float8_e4m3fn).reshape(rows, cols // 16).clone(),
                "weight_global_scale": (1.0 / q.tensor_scale.float()).reshape(1)}
    scale = _scale_tensor(q)
    if fmt == "float-quantized":
        return {"weight": q.codes.view(torch.float8_e4m3fn).reshape(rows, cols).clone(), "weight_scale": scale}
    if fmt == "int-quantized":  # int8 codes are the two's-complement bytes
        return {"weight": q.codes.view(torch.int8).reshape(rows, cols).clone(), "weight_scale": scale}
    shift = 0 if s.fmt.is_signed else 2 ** (s.bits - 1)  # lowbit uint grid -> the signed grid
    offset = 2 ** (s.bits - 1)
    if (cols * s.bits) % 32 == 0:
        # Rows fill whole words, so the stream is lowbit's own packing: stored q + 2^(b-1) is a signed
        # code with its sign bit flipped, and an unsigned code as it is.
        flip = sign_bits(s.bits) if s.fmt.is_signed else 0
        packed = (q.codes ^ flip).view(torch.int32).reshape(rows, -1)
    else:
        ints = s.fmt.decode_integers(q.unpack_codes())  # int32 [out, in], on the format's own grid
        packed = pack_int32_rows((ints - shift + offset).to(torch.uint8), s.bits)
    out = {"weight_packed": packed, "weight_scale": scale,
           "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
    if not s.symmetric:
        z = q.zero_values().reshape(scale.shape)  # integers (integer_zero), on lowbit's grid
        zq = (z.round().to(torch.int32) - shift + offset).to(torch.uint8)
        out["weight_zero_point"] = pack_int32_rows(zq.t().contiguous(), s.bits).t().contiguous()
    return out


def _scale_tensor(q: QTensor) -> torch.Tensor:
    """Scales in their stored dtype, shaped as compressed-tensors initialises them."""
    s, g = q.scheme, q.scheme.granularity
    t = q.scales.to(_SCALE_DTYPES[s.scale_format])
    if isinstance(g, PerChannel):
        return t.reshape(-1, 1).clone()
    if isinstance(g, PerTensor):
        return t.reshape(1).clone()
    return t.reshape(q.shape[0], -1).clone() if isinstance(g, PerGroup) else t.clone()


# -- save -----------------------------------------------------------------------
def save_compressed_tensors(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Write a model quantized by lowbit.quantize as a compressed-tensors folder (config.json with its
    quantization_config, model.safetensors, tokenizer), atomically. Every QuantLinear must map onto a
    compressed-tensors layout (see ct_scheme); other modules are written as they are. A quantized
    embedding table (and an output layer tied to it) is written dense with the exact values lowbit
    uses: transformers has no quantized embedding layer.

        >>> lowbit.save(model, "out/", format="compressed-tensors", tokenizer=tok)
    """
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from safetensors.torch import save_file

    from ..nn import LLMInt8Linear, QuantEmbedding, QuantLinear

    path = Path(path)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"{type(model).__name__} has no transformers config: compressed-tensors checkpoints "
                         "are Hugging Face folders; save with format='lowbit'")
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, tuple[str, dict, list[str]]] = {}  # scheme key -> (format, scheme, module names)
    tables, dense_heads = {}, []  # id(QTensor) of quantized embedding tables; Linears tied to one
    for name, m in model.named_modules():
        if isinstance(m, QuantEmbedding):
            # transformers loads quantized Linear layers only: the table goes dense, holding exactly
            # the values lowbit looks up, so the logits still match lowbit's model
            tensors[f"{name}.weight"] = m.weight.detach()
            tables[id(m.qweight)] = name
            continue
        if not isinstance(m, QuantLinear):
            continue
        if id(m.qweight) in tables:  # a head tied to the table: transformers ties it again on load
            dense_heads.append(name)
            continue
        if isinstance(m, LLMInt8Linear):
            raise ValueError(f"module {name!r}: LLM.int8() (outlier columns in full precision) has no "
                             "compressed-tensors layout; save with format='lowbit'")
        fmt, scheme = ct_scheme(m.qweight, m.act_scheme, m.act_scale, m.act_zero, where=f"module {name!r}")
        for k, v in weight_tensors(m.qweight, fmt).items():
            tensors[f"{name}.{k}"] = v
        if scheme["input_activations"] and not scheme["input_activations"]["dynamic"]:
            tensors[f"{name}.input_scale"] = m.act_scale.float().reshape(1)
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to(m.dtype)
        key = json.dumps([fmt, scheme], sort_keys=True)
        groups.setdefault(key, (fmt, scheme, []))[2].append(name)
    if not groups:
        raise ValueError("the model has no QuantLinear: quantize it with lowbit.quantize before exporting")
    quantized = {n for _, _, names in groups.values() for n in names}
    _add_plain_tensors(model, quantized, tensors)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized] + dense_heads
    single = len(groups) == 1
    config_groups = {f"group_{i}": QuantizationScheme(targets=["Linear"] if single else names, format=fmt,
                                                      **scheme)
                     for i, (fmt, scheme, names) in enumerate(groups.values())}
    formats = {fmt for fmt, _, _ in groups.values()}
    qconfig = QuantizationConfig(config_groups=config_groups, ignore=ignore, quantization_status="compressed",
                                 format=formats.pop() if len(formats) == 1 else "mixed-precision")
    cfg = hf_config_dict(model)
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD, **qconfig.model_dump(exclude=["quant_method"])}
    return _write_folder(path, tensors, cfg, model, tokenizer, save_file)


def _add_plain_tensors(model: nn.Module, quantized: set[str], tensors: dict) -> None:
    """Every state_dict tensor outside the QuantLinears, tied weights stored once (under the first name)."""
    seen = set()
    for key, t in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in quantized or any(key.startswith(f"{n}.qweight") for n in quantized):
            continue
        if t.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device: materialise the model before saving")
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        tensors[key] = t.detach()


def hf_config_dict(model: nn.Module) -> dict:
    """The model's config.json as a dict, carrying rope_theta both at the top level (transformers 4.x,
    llama.cpp's converter) and inside rope_parameters (transformers 5)."""
    cfg = model.config.to_dict()
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    elif "rope_theta" in cfg and rope is None:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    cfg.pop("quantization_config", None)
    return cfg


def _write_folder(path: Path, tensors: dict, cfg: dict, model, tokenizer, save_file) -> Path:
    with staged_dir(path, lambda d: (d / "config.json").is_file()) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))  # last: marks a whole save
    return path


# -- read -----------------------------------------------------------------------
def ct_module(t: dict[str, torch.Tensor], fmt: str, scheme, where: str) -> dict:
    """One quantized Linear's tensors (local names) in compressed-tensors layout `fmt` ->
    {"qweight": QTensor, "act_scheme": Scheme | None, "act_scale": tensor | None}."""
    from ..core import Scheme
    from .gptq_awq import int_qtensor, row_bytes, unpack_int32_rows

    w, a = scheme.weights, scheme.input_activations
    strategy = w.strategy if isinstance(w.strategy, str) else w.strategy.value
    act, act_scale = None, None
    if a is not None:
        a_strategy = a.strategy if isinstance(a.strategy, str) else a.strategy.value
        a_type = a.type if isinstance(a.type, str) else a.type.value
        if a_type == "float" and a.num_bits == 8 and a_strategy == "token" and a.dynamic is True:
            act = Scheme("fp8_e4m3", PerToken())  # FP8_DYNAMIC
        elif a_type == "int" and a.num_bits == 8 and a.symmetric and a_strategy in ("token", "tensor"):
            act = Scheme("int8", PerToken() if a_strategy == "token" else PerTensor())
            act_scale = None if a.dynamic else _need(t, "input_scale", where).float().reshape(())
        else:
            raise ValueError(f"{where}: input activations {a_type}{a.num_bits} ({a_strategy}, dynamic={a.dynamic}) "
                             "are not read by lowbit (symmetric int8 per token or per tensor, fp8 per token "
                             "dynamic)")
    gran = {"group": lambda: PerGroup(w.group_size), "channel": lambda: PerChannel(0), "tensor": PerTensor,
            "block": lambda: PerBlock(*w.block_structure)}
    if fmt == "pack-quantized":
        if strategy not in ("group", "channel"):
            raise ValueError(f"{where}: pack-quantized strategy {strategy!r} is not read (group, channel)")
        rows, cols = (int(v) for v in _need(t, "weight_shape", where))
        b, scale, packed = w.num_bits, _need(t, "weight_scale", where), _need(t, "weight_packed", where)
        group = w.group_size if strategy == "group" else None
        _shape(where, "weight_packed", packed, (rows, -(-cols * b // 32)), torch.int32)
        _shape(where, "weight_scale", scale, (rows, cols // group if group else 1), None)
        if w.symmetric:
            z = torch.full(scale.shape, 2 ** (b - 1), dtype=torch.int16)
        else:
            zp = _need(t, "weight_zero_point", where)
            _shape(where, "weight_zero_point", zp, (-(-rows * b // 32), scale.shape[1]), torch.int32)
            z = unpack_int32_rows(zp.t(), b, rows).t().to(torch.int16)  # stored zp + 2^(b-1): lowbit's uint grid
        # stored q + 2^(b-1) is lowbit's unsigned code; rows that fill whole words are already its stream
        u = row_bytes(packed) if (cols * b) % 32 == 0 else pack_bits_le(unpack_int32_rows(packed, b, cols), b)
        q = int_qtensor(u, (rows, cols), z, scale, b, group)
    elif fmt in ("int-quantized", "naive-quantized", "float-quantized") and strategy in gran:
        weight, scale = _need(t, "weight", where), _need(t, "weight_scale", where)
        fmt_name = {torch.int8: "int8", torch.float8_e4m3fn: "fp8_e4m3"}.get(weight.dtype)
        if fmt_name is None or not w.symmetric:
            raise ValueError(f"{where}.weight: {weight.dtype} ({'symmetric' if w.symmetric else 'affine'}) is not "
                             "read by lowbit (symmetric int8 or float8_e4m3fn)")
        g = gran[strategy]()
        scheme_ = Scheme(fmt_name, g, scale_format=_scale_name(scale))
        stats = scale if isinstance(g, (PerGroup, PerBlock)) else scale.reshape(-1)
        q = QTensor(weight.contiguous().view(torch.uint8).reshape(-1), tuple(weight.shape), scheme_,
                    scales=stats.reshape(()) if isinstance(g, PerTensor) else stats.contiguous())
    elif fmt == "nvfp4-pack-quantized":
        from ..core.scheme import SCHEMES

        packed, scale = _need(t, "weight_packed", where), _need(t, "weight_scale", where)
        q = QTensor(packed.contiguous().reshape(-1), (packed.shape[0], packed.shape[1] * 2), SCHEMES["nvfp4"],
                    scales=scale.contiguous().view(torch.uint8),
                    tensor_scale=(1.0 / _need(t, "weight_global_scale", where).float()).reshape(()))
    else:
        raise ValueError(f"{where}: compressed-tensors format {fmt!r} ({strategy}) is not read by lowbit "
                         "(pack-quantized, int-quantized, float-quantized, nvfp4-pack-quantized)")
    return {"qweight": q, "act_scheme": act, "act_scale": act_scale}


def _scale_name(scale: torch.Tensor) -> str:
    names = {v: k for k, v in _SCALE_DTYPES.items()}
    if scale.dtype not in names:
        raise ValueError(f"weight_scale of dtype {scale.dtype}: expected float32, float16 or bfloat16")
    return names[scale.dtype]


def _shape(where: str, key: str, t: torch.Tensor, shape: tuple, dtype) -> None:
    if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype):
        raise ValueError(f"{where}.{key}: shape {tuple(t.shape)} {t.dtype}, expected {tuple(shape)}"
                         + (f" {dtype}" if dtype is not None else ""))


def _need(t: dict, key: str, where: str) -> torch.Tensor:
    if key not in t:
        raise ValueError(f"{where}.{key}: tensor is missing")
    return t[key]
