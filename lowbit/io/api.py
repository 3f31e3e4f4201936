"""lowbit.save / lowbit.load: one verb each, the file format chosen by name."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from . import atomic
from .lowbit_format import load_lowbit, save_lowbit

SAVE_FORMATS = ("lowbit", "gguf", "compressed-tensors", "deep-compression")


def save(model: nn.Module, path: str | Path, format: str | None = None, *, tokenizer=None,
         source: str | None = None, recipe: str | None = None, pre_tokenizer: str | None = None) -> Path:
    """Write a model quantized by lowbit.quantize. `source` (e.g. "smollm2-135m") is recorded so
    `lowbit eval` can compare with the full-precision model later.

    format: "lowbit" (a folder) or "gguf" (one file for llama.cpp); default from the suffix (.gguf).
    "deep-compression": one safetensors file of a model compressed by
    lowbit.pipeline.deep_compress (Huffman-coded SharedLinear layers, io/deep_compression.py).
    GGUF: `recipe` is a llama.cpp file type (f16 by default, q8_0, q4_0, q4_k_m, ...; see
    lowbit.io.gguf.mixtures), float weights are rounded to nearest in its blocks (a quantized layer
    whose scheme a GGML type holds exactly, int8/int4 groups of 32 with fp16 scales as q8_0/q4_0,
    keeps its codes; the others are rounded again, with a warning), and the tokenizer is
    copied from the GGUF file given as `source` (or the one the model was loaded from), else converted
    from `tokenizer`; `pre_tokenizer` names llama.cpp's split for a byte-level BPE tokenizer lowbit does
    not recognise (e.g. "llama-bpe"; see docs/gguf.md).
        lowbit.save(model, "smollm2-q8_0.gguf", recipe="q8_0", source="smollm2-135m")
    """
    if format is None:
        format = "gguf" if Path(path).suffix == ".gguf" else "lowbit"
    if format not in SAVE_FORMATS:
        raise ValueError(f"format={format!r}: this lowbit writes {', '.join(SAVE_FORMATS)} "
                         "(give format=None to choose by the path's suffix)")
    if pre_tokenizer is not None and format != "gguf":
        raise ValueError(f"save(pre_tokenizer={pre_tokenizer!r}) names llama.cpp's split for a GGUF file's "
                         f"tokenizer; format={format!r} keeps the tokenizer as transformers saves it: drop it")
    if format == "deep-compression":
        if recipe is not None or tokenizer is not None:
            raise ValueError("save(format='deep-compression') writes the model alone: drop recipe= and tokenizer=")
        from .deep_compression import save_deep_compressed

        save_deep_compressed(model, path)
        return Path(path)
    if format == "compressed-tensors":
        from .compressed_tensors import save_compressed_tensors

        return save_compressed_tensors(model, path, tokenizer=tokenizer)
    if format == "gguf":
        from .gguf.tokenizer import check_pre_tokenizer
        from .gguf.write import save_gguf

        check_pre_tokenizer(pre_tokenizer)
        recipe = recipe or getattr(model, "lowbit_gguf_recipe", None) or "f16"  # quantize_gguf's file type
        return save_gguf(model, path, recipe, tokenizer=tokenizer, source=source, pre_tokenizer=pre_tokenizer)
    if recipe is not None:
        raise ValueError("save(recipe=...) chooses GGUF tensor types; a lowbit checkpoint keeps the recipe "
                         "the model was quantized with (lowbit.quantize)")
    return save_lowbit(model, path, tokenizer=tokenizer, source=source)


def load(path: str | Path, model: nn.Module | None = None, *, keep_quantized: bool = False) -> nn.Module:
    """Rebuild a quantized model saved by lowbit.save (see load_lowbit); a .gguf file loads as a
    transformers model with dequantized float32 weights (see gguf.read.load_gguf), or with
    keep_quantized=True its q4_0, q8_0 and q4_k Linear weights as QuantLinear layers (the file's codes
    and scales, run by lowbit's kernels); a Deep Compression file (save(format="deep-compression"))
    decodes to nn.Linear layers holding exactly its shared weights; a Hugging Face folder quantized by another tool
    (compressed-tensors, GPTQ, AWQ) loads into QuantLinear layers (see hf_quantized)."""
    from .hf_quantized import load_hf_quantized, quant_method

    recover_folder(path)
    from .deep_compression import is_deep_compressed, load_deep_compressed

    if is_deep_compressed(path):
        if keep_quantized:
            raise ValueError(f"lowbit.load({str(path)!r}): a Deep Compression file decodes to dense weights; "
                             "drop keep_quantized=True")
        return load_deep_compressed(path, model)
    if Path(path).suffix == ".gguf":
        from .gguf.read import load_gguf

        if model is not None:
            raise ValueError("lowbit.load: a .gguf file builds its own model; do not pass model=")
        return load_gguf(path, keep_quantized=keep_quantized)
    if keep_quantized:
        raise ValueError(f"lowbit.load({str(path)!r}, keep_quantized=True): the option chooses how a .gguf file "
                         "loads; lowbit and Hugging Face quantized folders always load quantized")
    if model is None and not (Path(path) / "lowbit.json").exists() and quant_method(Path(path)):
        return load_hf_quantized(path)
    return load_lowbit(path, model=model)


def recover_folder(path: str | Path) -> bool:
    """Put back a checkpoint folder that a save stopped between its two renames left aside (lowbit's own
    or a compressed-tensors folder; see atomic.recover). True when it did."""
    return atomic.recover(Path(path), _whole_folder)


def _whole_folder(folder: Path) -> bool:
    # each writer writes its marker last: lowbit.json (lowbit), config.json (compressed-tensors)
    return (folder / "lowbit.json").is_file() or (folder / "config.json").is_file()
