import copy
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

DATA = Path(__file__).resolve().parent / "data"
SMOLLM2_LAYERS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="session")
def smollm2_weights() -> dict[str, torch.Tensor]:
    """The seven projection weights of SmolLM2-135M's first block, float32 [out, in]."""
    from lowbit.io import builtin_model_path, read_gguf_tensors

    names = [f"blk.0.{p}.weight" for p in SMOLLM2_LAYERS]
    return read_gguf_tensors(builtin_model_path("smollm2-135m"), names)


def save_hf_folder(model, tok, folder: Path) -> Path:
    """A copy of `model` (SmolLM2 loaded from its GGUF file, so already dequantized to fp32) and its
    tokenizer written as a plain Hugging Face folder, as a user would pass to `lowbit quantize`."""
    small = copy.deepcopy(model)
    small.hf_quantizer = None
    small.config.__dict__.pop("quantization_config", None)
    small.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def wikitext_excerpt(split: str = "test") -> str:
    """The opening ~90 kB of wikitext-2 `split` ("test" or "valid"), carried by the repository
    (tests/data/wikitext-2, CC BY-SA 3.0) so the suite runs in any clone; benchmarks read the full
    files from ../shared with lowbit.io.wikitext2()."""
    return (DATA / "wikitext-2" / f"{split}-excerpt.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """gguf-py's reader over SmolLM2's source GGUF (written by llama.cpp's quantizer as Q4_1); parsed once
    (seconds: 49k tokens)."""
    import gguf

    from lowbit.io import builtin_model_path

    return gguf.GGUFReader(str(builtin_model_path("smollm2-135m")))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def smollm2_full():
    """SmolLM2-135M-Instruct (fp32) and its tokenizer, loaded once per test run. Do not mutate."""
    from lowbit.io import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_2layers(smollm2_full):
    """A copy of SmolLM2 cut to its first 2 decoder layers. Do not mutate: deepcopy first."""
    model, tok = smollm2_full
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:2]
    small.config.num_hidden_layers = 2
    return small, tok


def tiny_transformer(arch: str, layers: int):
    """A randomly initialised transformers model from a config (no download): gpt2 (Conv1D
    layers with [in, out] weights), qwen2 (grouped-query attention) or bert (an encoder)."""
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=100, n_positions=64))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    else:
        model = tf.BertModel(tf.BertConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                                           num_attention_heads=4, vocab_size=100))
    return model.eval()
