"""L5: what quantization costs: perplexity, KL and top-1 agreement, embedding fidelity, size, speed.

Pure library functions over torch modules; everything runs under torch.inference_mode() and works
whatever modules replace a model's Linear layers.
"""
from .embedding import EmbeddingFidelity, embedding_fidelity, sentence_embeddings, sentences_from_text, spearman
from .perplexity import Perplexity, Reference, Report, evaluate, perplexity, token_ids, windows
from .size import ModelSize, linear_bits_per_weight, model_size
from .speed import GenerationSpeed, generation_speed

__all__ = [
    "EmbeddingFidelity", "GenerationSpeed", "ModelSize", "Perplexity", "Reference", "Report",
    "embedding_fidelity", "evaluate", "generation_speed", "linear_bits_per_weight", "model_size", "perplexity",
    "sentence_embeddings", "sentences_from_text", "spearman", "token_ids", "windows",
]
