"""lowbit.save / lowbit.load: one verb each, the file format chosen by name."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .lowbit_format import load_lowbit, save_lowbit

SAVE_FORMATS = ("lowbit", "compressed-tensors")


def save(model: nn.Module, path: str | Path, format: str = "lowbit", *, tokenizer=None,
         source: str | None = None) -> Path:
    """Write a model quantized by lowbit.quantize. `source` (e.g. "smollm2-135m") is recorded so
    `lowbit eval` can compare with the full-precision model later."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"format={format!r}: this lowbit writes {', '.join(SAVE_FORMATS)} "
                         "(GGUF and compressed-tensors export are planned)")
    if format == "compressed-tensors":
        from .compressed_tensors import save_compressed_tensors

        return save_compressed_tensors(model, path, tokenizer=tokenizer)
    return save_lowbit(model, path, tokenizer=tokenizer, source=source)


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a quantized model saved by lowbit.save (see load_lowbit), or read a Hugging Face folder
    quantized by another tool (compressed-tensors, GPTQ, AWQ; see hf_quantized)."""
    from .hf_quantized import load_hf_quantized, quant_method

    if model is None and not (Path(path) / "lowbit.json").exists() and quant_method(Path(path)):
        return load_hf_quantized(path)
    return load_lowbit(path, model=model)
