"""Write a transformers decoder (every architecture in gguf/arch.py: Llama, Qwen, Gemma, Phi-3, OLMo 2,
Granite, SmolLM3 and the MoE models Mixtral, Qwen2-MoE, Qwen3-MoE) as a GGUF file for llama.cpp.

    save_gguf(model, "model.gguf", "q4_k_m", tokenizer=tok, source="smollm2-135m")

The container is written by the `gguf` package (GGUFWriter); the blocks come from
lowbit.core.ggml_blocks; which tensor gets which type follows llama.cpp's quantizer
(gguf.mixtures). The tokenizer is copied from a GGUF source (the `tokenizer.*` keys as they are), or,
for a model with no GGUF source, converted from the transformers tokenizer (gguf.tokenizer).
Written to a temporary file beside the target and renamed into place, so a failed save leaves nothing.
"""
from __future__ import annotations

import functools
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ...core.ggml_blocks import dequantize_rows, get_type, quantize_rows
from .arch import (hparams, model_arch, n_expert, permute_rows, permuted_heads, rope_freqs, tensor_groups,
                   value_offset)
from .mixtures import file_type
from .qtensor import join_blocks


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a floating-point tensor in its own dtype (the caller takes .float() of one at a time,
    so a bf16 model is never held twice in float32); quantized layers (QuantLinear, QuantEmbedding) give their
    dequantized weight; fused experts (gate_up_proj [E, 2f, h], down_proj [E, h, f]) give each
    expert's gate_proj, up_proj, down_proj as `...experts.{e}.gate_proj.weight`."""
    from ...nn import QuantLinear
    from ...pipeline.experts import is_fused_experts

    out, seen = {}, set()
    for name, q in quantized_weights(model).items():
        if id(q) not in seen:  # a tied head shares the table's QTensor: dequantized once, under the table's name
            seen.add(id(q))
            out[f"{name}.weight"] = q.dequantize().float()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().float()
    for key, t in model.state_dict().items():
        if ".qweight." in key or key.endswith((".act_scale", ".act_zero")) or key in out:
            continue
        out[key] = t.detach() if t.is_floating_point() else t.detach().float()
    for name, m in model.named_modules():
        if is_fused_experts(m):  # transformers 5's fused experts, as the per-expert weights RoutedExperts holds
            gate_up, down = out.pop(f"{name}.gate_up_proj"), out.pop(f"{name}.down_proj")
            f = gate_up.shape[1] // 2
            for e in range(gate_up.shape[0]):
                out[f"{name}.{e}.gate_proj.weight"], out[f"{name}.{e}.up_proj.weight"] = gate_up[e, :f], gate_up[e, f:]
                out[f"{name}.{e}.down_proj.weight"] = down[e]
    return out


def quantized_weights(model: nn.Module) -> dict:
    """{module name: QTensor} of every quantized layer (QuantLinear, QuantEmbedding): their weights
    live outside state_dict."""
    from ...nn import QuantEmbedding, QuantLinear

    return {name: m.qweight for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


_COPIED_GENERAL = ("general.name", "general.organization", "general.finetune", "general.basename",
                   "general.size_label", "general.license", "general.languages")


def tokenizer_metadata(model: nn.Module, tokenizer, source: str | Path | None,
                       vocab_size: int, pre_tokenizer: str | None = None) -> dict[str, tuple]:
    """{key: (value, value type, array item type)} for the tokenizer.* keys: copied (with the descriptive
    general.* keys) from a GGUF source when there is one, else converted from `tokenizer`."""
    src = tokenizer_source(model, source)
    if src is not None and pre_tokenizer is not None:
        raise ValueError(f"pre_tokenizer={pre_tokenizer!r} names the split of a converted tokenizer; the tokenizer "
                         f"is copied from {src} as it is: drop pre_tokenizer=, or pass tokenizer= without a source")
    if src is not None:
        fields = _source_fields(str(src), src.stat().st_mtime_ns)
        what = f"tokenizer source {src}"
    elif tokenizer is not None:
        from .tokenizer import tokenizer_fields

        fields = tokenizer_fields(tokenizer, vocab_size, pre_tokenizer)
        what = "the tokenizer"
    else:
        raise ValueError("GGUF export needs a tokenizer: pass tokenizer=<the transformers tokenizer> (converted), "
                         "or source=<a .gguf path or built-in model> to copy one from a GGUF file")
    n_tokens = len(fields["tokenizer.ggml.tokens"][0]) if "tokenizer.ggml.tokens" in fields else 0
    if not n_tokens:
        raise ValueError(f"{what} has no tokenizer.ggml.tokens")
    if n_tokens != vocab_size:
        raise ValueError(f"{what} has {n_tokens} tokens, the model {vocab_size}")
    return fields


@functools.lru_cache(maxsize=4)
def _source_fields(source: str, mtime_ns: int) -> dict:
    """{key: (value, value type, array item type)}, read by lowbit's own parser (gguf-py's reader took 4 s
    over SmolLM2's 49,152 tokens); cached."""
    import gguf

    from .file import parse_gguf

    parsed = parse_gguf(source)  # a bad file: ValueError naming it
    out = {}
    for key, value in parsed.meta.items():
        if key.startswith("tokenizer.") or key in _COPIED_GENERAL:
            vtype = parsed.types[key]
            if isinstance(vtype, tuple):
                out[key] = (value, gguf.GGUFValueType(vtype[0]), gguf.GGUFValueType(vtype[1]))
            else:
                out[key] = (value, gguf.GGUFValueType(vtype), None)
    return out


def tokenizer_source(model: nn.Module, source: str | Path | None) -> Path | None:
    """The GGUF file whose tokenizer is copied: `source` (a .gguf path or built-in alias), else the file
    the model was loaded from; None when there is neither (the tokenizer is then converted)."""
    from ..builtin import BUILTIN, builtin_model_path

    src = source if source is not None else getattr(model, "lowbit_gguf_source", None)
    if src is None:
        return None
    if isinstance(src, str) and src in BUILTIN:
        src = builtin_model_path(src)
    if Path(src).suffix != ".gguf" or not Path(src).is_file():
        raise ValueError(f"GGUF export copies the tokenizer from source={src!r}, which is not a .gguf file; "
                         "pass a .gguf path or built-in model, or leave source out to convert tokenizer=")
    return Path(src)


def gguf_tensors(model: nn.Module, recipe: str):
    """Yield (gguf name, uint8 blocks [rows, bytes], GGML type name, shape) in file order.

    A block's experts are stacked into one [E, out, in] tensor (ffn_*_exps). A quantized layer's
    QTensor that a GGML block type holds exactly (qtensor.join_blocks: q8_0, q4_0, q5_0, q4_1, q5_1)
    is written as it is, whatever type the recipe gives that tensor (for stacked experts: when every
    expert's blocks have one type); the others are rounded again to the recipe's type, with one
    warning naming them."""
    config, arch = model_arch(model)
    ft = file_type(recipe)
    state = float_state(model)
    quantized = {f"{name}.weight": q for name, q in quantized_weights(model).items()}
    solved = getattr(model, "lowbit_gguf_blocks", None) or {}
    tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in state
    if tied:
        state.pop("lm_head.weight", None)
    n_layer, n_exp = config.num_hidden_layers, n_expert(config)
    n_gqa = config.num_attention_heads // config.num_key_value_heads
    freqs = rope_freqs(config)
    if freqs is not None:  # llama.cpp's converter writes it first
        yield "rope_freqs.weight", quantize_rows(freqs[None], "f32"), "f32", tuple(freqs.shape)
    rerounded = []
    for name, (layer, keys) in tensor_groups(state, arch, n_exp).items():
        t = torch.stack([state[k].float() for k in keys]) if len(keys) > 1 else state[keys[0]].float()
        n_head = permuted_heads(name, arch, config)
        w = t.numpy()
        offset = value_offset(keys[0], arch)
        w = w + np.float32(offset) if offset else w
        w = permute_rows(w, n_head) if n_head else w
        kind = (ft.tensor_type(name, ne0=w.shape[-1], layer=layer, n_layer=n_layer, n_gqa=n_gqa,
                               has_output=not tied, arch=arch.gguf, n_expert=n_exp)
                if ft.quantizes(name, w.ndim) else "f32")
        kept = [_kept_blocks(k, kind, state[k].float(), name, solved, quantized) for k in keys]
        if all(b is not None for b in kept) and len({b[0] for b in kept}) == 1:
            kind, data = kept[0][0], np.concatenate([b[1] for b in kept])
            data = permute_rows(data, n_head) if n_head else data  # the layer's own rows: permuted like the weight
        else:
            if any(k in quantized for k in keys) and kind != "f32":  # f32 holds the dequantized values exactly
                rerounded.append(name)
            try:
                data = quantize_rows(w.reshape(-1, w.shape[-1]), kind)
            except ValueError as e:
                raise ValueError(f"tensor {name!r} ({keys[0]}, shape {tuple(w.shape)}): {e}") from e
        yield name, data, kind, tuple(w.shape)
        for k in keys:  # its float32 copy goes now, not at the end
            del state[k]
    if rerounded:
        warnings.warn(f"GGUF export: {len(rerounded)} quantized tensor(s) have no GGML block type that holds "
                      f"their scheme exactly ({', '.join(rerounded[:3])}{', ...' if len(rerounded) > 3 else ''}); "
                      f"their dequantized weights were rounded again to the {recipe} file's types, which loses "
                      "the codes the quantizer chose (q8_0, q4_0, q5_0 keep int8/int4/int5 groups of 32 with fp16 "
                      "scales as they are)", stacklevel=3)


def _weight_values(model: nn.Module) -> int:
    """Values the file will hold (the progress bar's total: K-quant search time goes with it)."""
    held = {id(p): p.numel() for p in model.parameters()}
    held.update({id(q): math.prod(q.shape) for q in quantized_weights(model).values()})
    freqs = rope_freqs(model.config)  # written beside the weights (llama3 rope)
    return sum(held.values()) + (0 if freqs is None else freqs.size)


def _kept_blocks(key: str, kind: str, t: torch.Tensor, name: str, solved: dict, quantized: dict):
    """(type, blocks) of weight `key` as a calibrated solve or an exact QTensor left them, else None."""
    data = _solved_blocks(solved[key], kind, t, name) if key in solved else None
    if data is not None:
        return kind, data
    return join_blocks(quantized[key]) if key in quantized else None


def _solved_blocks(solved: tuple, kind: str, t: torch.Tensor, name: str):
    """The blocks a calibrated solve left for `key` (pipeline/gguf_calibrated.py), if they still hold:
    the same GGML type as this file gives the tensor, and decoding to the layer's current weights."""
    solved_kind, data = solved
    if solved_kind != kind:
        warnings.warn(f"tensor {name!r}: calibrated as {solved_kind} but this file type gives it {kind}; "
                      "written by round to nearest", stacklevel=3)
        return None
    if not torch.equal(torch.from_numpy(dequantize_rows(data, kind, t.shape[-1])), t.reshape(-1, t.shape[-1])):
        warnings.warn(f"tensor {name!r}: the weights changed after the calibrated solve; written by round to "
                      "nearest", stacklevel=3)
        return None
    return data


def _add(w, key: str, value) -> None:
    """One metadata key through GGUFWriter, typed as llama.cpp reads it (arch.hparams' value kinds)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


def save_gguf(model: nn.Module, path: str | Path, recipe: str = "f16", *, tokenizer=None,
              source: str | Path | None = None, pre_tokenizer: str | None = None) -> Path:
    """Write `model` to GGUF file `path` with llama.cpp file type `recipe` (f32, f16, bf16, q8_0, q4_0,
    q4_1, q5_0, q5_1, ...), quantizing each float weight by round to nearest; atomically. A model
    quantized by a lowbit recipe keeps the codes of every layer a GGML type holds exactly (see
    gguf_tensors), its embedding table included. `pre_tokenizer`: the llama.cpp pre-tokenizer name for a
    converted byte-level BPE tokenizer (gguf.tokenizer.tokenizer_fields)."""
    import gguf

    path = Path(path)
    config, arch = model_arch(model)
    ft = file_type(recipe)
    tok_fields = tokenizer_metadata(model, tokenizer, source, config.vocab_size, pre_tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch.gguf)
        for key, value in hparams(config, arch).items():
            _add(w, key, value)
        w.add_file_type(ft.ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, (value, vtype, sub) in tok_fields.items():
            w.add_key_value(key, value, vtype, sub_type=sub)
        with tqdm(total=_weight_values(model), desc=f"write {recipe}", unit="w", unit_scale=True) as bar:
            for name, data, kind, shape in gguf_tensors(model, recipe):
                # GGUFWriter turns a uint8 array's byte shape back into the value shape (and reverses it)
                w.add_tensor(name, data.reshape(*shape[:-1], data.shape[-1]),
                             raw_dtype=gguf.GGMLQuantizationType(get_type(kind).id))
                bar.update(math.prod(shape))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a saved model is an ordinary file
        os.replace(tmp, path)
    except ValueError as e:
        Path(tmp).unlink(missing_ok=True)
        raise ValueError(f"writing {path}: {e}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
