"""lowbit: neural-network quantization toolkit.

    import lowbit
    q = lowbit.quantize_tensor(w, "int4", granularity="group", group_size=64)
    lowbit.quantize(model, "w4g64", method="hqq")
    lowbit.save(model, "out/"); model = lowbit.load("out/")
    lowbit.eval.perplexity(model, tokenizer, text)
    recipe = lowbit.search(model, budget_bits=4.25, calibration=windows)   # mixed precision
    lowbit.qat.prepare(model, "w3g64"); train; lowbit.qat.convert(model)
    model.generate(ids, cache=lowbit.kv_cache("int4"))   # past_key_values= before transformers 5.2x
"""
from .version import __version__
from . import core, eval, formats
from .core import QTensor, Scheme, error_stats, quantize_tensor
from .io import load, load_model, save
from .pipeline import Recipe, quantize
from .analysis import layer_report, search
from . import qat  # noqa: E402  (after pipeline, which it builds on)


def kv_cache(format: str = "int4", **options):
    """A quantized KV cache for transformers' generate()/forward (nn/kv_cache.py; needs transformers).

        >>> model.generate(ids, cache=lowbit.kv_cache("int4", group_size=64), max_new_tokens=32)

    The keyword is `cache` from transformers 5.2x on, `past_key_values` before;
    `lowbit.nn.cache_keyword(model)` says which one a model takes.
    """
    from .nn.kv_cache import kv_cache as make  # transformers is optional: imported when asked for
    return make(format, **options)


__all__ = ["formats", "core", "eval", "qat", "QTensor", "Scheme", "Recipe", "quantize_tensor", "quantize",
           "error_stats", "save", "load", "load_model", "search", "layer_report", "kv_cache", "__version__"]
