"""L3: modules that run quantized models (no math of their own)."""
from .bitlinear import BitLinear
from .cache import cache_keyword
from .embedding import QuantEmbedding
from .experts import ExpertMLP, RoutedExperts
from .linear import QuantLinear
from .llm_int8 import LLMInt8Linear, OutlierStats, outlier_stats
from .shared_linear import SharedLinear

__all__ = ["BitLinear", "QuantEmbedding", "QuantLinear", "LLMInt8Linear", "OutlierStats", "outlier_stats",
           "SharedLinear", "ExpertMLP", "RoutedExperts", "cache_keyword", "use_kv_attention"]


def use_kv_attention(model) -> None:
    """Make a transformers model read lowbit.kv_cache from its codes (nn/kv_attention.py; needs transformers)."""
    # transformers is optional: imported when asked for
    from .kv_attention import use_kv_attention as use

    use(model)
