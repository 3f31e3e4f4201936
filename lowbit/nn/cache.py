"""The keyword a transformers model takes its KV cache by.

transformers 5.2x renamed `past_key_values` to `cache` in forward() and generate() (the old name
still works and warns); earlier releases (4.46 up to 5.1x) know `past_key_values` only. The model's
own forward signature says which one it declares, whatever the version string. No transformers
import here: this works with every transformers lowbit supports.
"""
from __future__ import annotations

import inspect


def cache_keyword(model) -> str:
    """"cache" where `model.forward` declares it (transformers >= 5.2x), else "past_key_values".

        >>> model.generate(ids, **{cache_keyword(model): lowbit.kv_cache("int4")}, max_new_tokens=32)
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"
