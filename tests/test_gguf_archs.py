"""Every architecture lowbit writes to GGUF (io/gguf/arch.py), judged by llama.cpp (tests/llama_cpp_judge.py).

For each: a tiny random-weight model from its transformers config, its vocabulary from a byte-level BPE
trained here with `tokenizers`, written as
- f32: llama.cpp's logits match transformers' on the same token ids (F32_REL_ERR), and lowbit.load reads
  the file back to the same model;
- q4_k_m: llama.cpp's logits match lowbit.load()'s of that same file (Q4_K_M_REL_ERR: llama.cpp multiplies
  K-quant weights by activations rounded to 8-bit blocks, lowbit by float activations).
Hidden and feed-forward sizes are 256 so that every row is whole K-quant blocks (no fallback types).
The weights are drawn wider than transformers' default (initializer_range 0.1), so attention is
sharp and positions matter: a wrong rope or window moves logits by tens of percent, not 1e-3.
"""
import numpy as np
import pytest
import torch
from llama_cpp_judge import logits, rel_err

import lowbit
from lowbit.io.gguf.arch import ARCHS, support_table
from lowbit.pipeline.experts import unfuse_experts

VOCAB = 320
N_TOKENS = 60
# measured (60 tokens, largest relative 2-norm error over positions), f32 file in llama.cpp vs
# transformers: 0.5e-6 .. 6e-6 for the dense cases, 1.2e-5 (mixtral), 1.5e-5 (qwen3_moe), 4.6e-5
# (qwen2_moe: its sharp router weights amplify the last bits); llama.cpp's matmuls sum in another order
F32_REL_ERR = 1e-4
# q4_k_m file in llama.cpp vs lowbit.load of it, per position: llama.cpp rounds the activations to q8_K
# blocks for its K-quant matmuls, lowbit multiplies float activations. Measured (initializer_range 0.05):
# median 0.008 .. 0.028 and largest position 0.014 .. 0.035 for the dense cases; MoE: median 0.027 ..
# 0.040, largest 0.08 (qwen2_moe), 0.10 (mixtral), 0.24 (qwen3_moe) at a position where the 8-bit
# activations flip a router's top-k choice. A wrong byte layout, type or transform gives > 0.5.
Q4_INIT = 0.05
Q4_K_M_MEDIAN = 0.06
Q4_K_M_MAX = 0.4

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=256)
GEMMA = dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=16, tie_word_embeddings=True)
# case -> (transformers model_type, config arguments beyond the common ones)
CASES = {
    "llama": ("llama", {}),
    "llama-rope-llama3": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "llama-rope-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "llama-rope-yarn": ("llama", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                           original_max_position_embeddings=64))),
    "mistral": ("mistral", dict(sliding_window=None)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=64)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, shared_expert_intermediate_size=256, **MOE)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, norm_topk_prob=True, head_dim=64, **MOE)),
    "gemma2": ("gemma2", dict(GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3_text": ("gemma3_text", dict(GEMMA, layer_types=["sliding_attention", "full_attention"],
                                        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                                         "full_attention": dict(rope_type="linear", factor=8.0,
                                                                                rope_theta=1000000.0)})),
    "phi3": ("phi3", dict(sliding_window=None)),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                                logits_scaling=8.0)),
    "smollm3": ("smollm3", dict(num_hidden_layers=4, no_rope_layer_interval=4)),
}


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE of VOCAB - 3 tokens trained on a few sentences (GGUF pre-tokenizer gpt-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"], show_progress=False)
    text = ["The tower is 324 metres tall, about the same height as an 81-storey building.",
            "Paris is the capital of France; the quick brown fox jumps over the lazy dog."]
    tok.train_from_iterator(text * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


ROUTER_SHARPNESS = 10.0


def tiny_model(case: str, initializer_range: float = 0.1):
    """A random-weight model of CASES[case]: hidden 256, 2 layers (unless the case says), 4 heads of 64,
    2 KV heads, norms drawn around their identity (Gemma: around 0, stored as 1 + w)."""
    import transformers as tf

    model_type, extra = CASES[case]
    torch.manual_seed(0)
    kw = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=initializer_range,
              bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False)
    kw.update(extra)
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(model_type, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if ARCHS[model_type].norm_offset else 1.0))
            if name.endswith("mlp.gate.weight"):  # a decided router: 8-bit activations flip no expert choice
                p.mul_(ROUTER_SHARPNESS)
    return model


def _ids():
    return torch.randint(2, VOCAB, (1, N_TOKENS), generator=torch.Generator().manual_seed(1))


def _logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits[0].float().numpy()


class Fp16Gelu(torch.nn.Module):
    """llama.cpp's CPU GELU (ggml-cpu/vec.h, GGML_GELU_FP16): a table over fp16 inputs holding fp16 outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()


def _with_llama_cpps_gelu(model):
    """The same model with llama.cpp's fp16-table GELU in every MLP (Gemma's tanh-GELU)."""
    import copy

    model = copy.deepcopy(model)
    for layer in model.model.layers:
        layer.mlp.act_fn = Fp16Gelu()
    return model


# Gemma's tanh-GELU runs through an fp16 table in llama.cpp's CPU build (GGML_GELU_FP16): measured
# 3.0e-4 (gemma2), 2.6e-4 (gemma3) against transformers' float GELU; with that table in transformers too,
# 0.6e-4 (gemma2), 1.0e-4 (gemma3; 0.6e-4 without its linear rope scaling): a rounding step to fp16
# turns the last-bit differences upstream into whole fp16 steps now and then.
GELU_FP16_REL_ERR = 1e-3
GELU_FP16_BOTH_REL_ERR = 2e-4


@pytest.mark.parametrize("case", CASES)
def test_f32_file_runs_in_llama_cpp_as_in_transformers(case, tokenizer, tmp_path):
    model, ids = tiny_model(case), _ids()
    want = _logits(model, ids)
    path = lowbit.save(model, tmp_path / f"{case}.gguf", recipe="f32", tokenizer=tokenizer)
    got = logits(path, ids[0])
    if ARCHS[model.config.model_type].gguf.startswith("gemma"):
        assert rel_err(got, want) < GELU_FP16_REL_ERR
        assert rel_err(got, _logits(_with_llama_cpps_gelu(model), ids)) < GELU_FP16_BOTH_REL_ERR
    else:
        assert rel_err(got, want) < F32_REL_ERR
    back = lowbit.load(path)
    assert ARCHS[back.config.model_type].gguf == ARCHS[model.config.model_type].gguf  # mistral reads as llama
    assert rel_err(_logits(back, ids), want) < 1e-6


def position_errors(got, want) -> np.ndarray:
    """|got - want| / |want| in the 2-norm of each position's logits."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)


@pytest.mark.parametrize("case", CASES)
def test_q4_k_m_file_runs_in_llama_cpp_as_in_lowbit(case, tokenizer, tmp_path):
    model = tiny_model(case, initializer_range=Q4_INIT)
    unfuse_experts(model)  # experts as nn.RoutedExperts (what lowbit.quantize makes); f32 wrote them fused
    path = lowbit.save(model, tmp_path / f"{case}.gguf", recipe="q4_k_m", tokenizer=tokenizer)
    ids = _ids()
    err = position_errors(logits(path, ids[0]), _logits(lowbit.load(path), ids))
    assert np.median(err) < Q4_K_M_MEDIAN and err.max() < Q4_K_M_MAX, (np.median(err), err.max())


def test_llama3_rope_is_written_as_llama_cpps_rope_freqs(tmp_path, tokenizer):
    import gguf

    model = tiny_model("llama-rope-llama3")
    path = lowbit.save(model, tmp_path / "x.gguf", recipe="f32", tokenizer=tokenizer)
    freqs = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"]
    # llama.cpp divides each rotary frequency by its factor; transformers folds the same into inv_freq
    d = model.config.head_dim
    plain = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    np.testing.assert_allclose(freqs, (plain / model.model.rotary_emb.inv_freq.double()).numpy(), rtol=1e-6)
    assert freqs.min() == 1.0 and freqs.max() == 8.0 and ((freqs > 1) & (freqs < 8)).any()


def test_refuses_a_config_llama_cpp_computes_otherwise(tokenizer, tmp_path):
    model = tiny_model("qwen3_moe")
    model.config.norm_topk_prob = False
    with pytest.raises(ValueError, match="norm_topk_prob=True"):
        lowbit.save(model, tmp_path / "x.gguf", recipe="f32", tokenizer=tokenizer)
    assert not list(tmp_path.iterdir())


def test_docs_hold_the_current_support_table():
    from pathlib import Path

    docs = (Path(__file__).parent.parent / "docs" / "gguf.md").read_text()
    assert support_table() in docs, "docs/gguf.md: paste lowbit.io.gguf.arch.support_table()'s output"


def test_quantized_moe_keeps_every_experts_codes(tokenizer, tmp_path):
    """lowbit.quantize unfuses the experts and quantizes each; int4 groups of 32 with fp16 scales are
    Q4_0 as they are, so every stacked ffn_*_exps tensor holds exactly the experts' codes."""
    import gguf

    from lowbit.core import Scheme
    from lowbit.core.granularity import PerGroup
    from lowbit.nn import QuantLinear
    from lowbit.pipeline.recipe import EMBEDDINGS_8BIT, Recipe

    model = tiny_model("qwen3_moe", initializer_range=Q4_INIT)
    lowbit.quantize(model, Recipe(Scheme("int4", PerGroup(32), scale_format="fp16"), embeddings=EMBEDDINGS_8BIT,
                                  output=EMBEDDINGS_8BIT), progress=False)
    experts = model.model.layers[1].mlp.experts
    assert all(isinstance(e.up_proj, QuantLinear) for e in experts)
    path = lowbit.save(model, tmp_path / "moe.gguf", tokenizer=tokenizer)
    t = {x.name: x for x in gguf.GGUFReader(path).tensors}["blk.1.ffn_up_exps.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0 and tuple(t.data.shape[:2]) == (4, 256)
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    for e, expert in enumerate(experts):
        assert np.array_equal(values[e], expert.up_proj.qweight.dequantize().float().numpy())
    ids = _ids()
    err = position_errors(logits(path, ids[0]), _logits(model, ids))
    assert np.median(err) < Q4_K_M_MEDIAN and err.max() < Q4_K_M_MAX, (np.median(err), err.max())


@pytest.mark.parametrize("case,method", [("qwen3", "rtn"), ("qwen3_moe", "rtn"), ("mixtral", "auto")])
def test_cli_quantizes_a_hugging_face_folder_to_gguf(tmp_path, tokenizer, capsys, case, method):
    """`lowbit quantize FOLDER --recipe q4_k_m --out x.gguf` on a folder as transformers saves it (dense
    and mixture-of-experts; `auto` calibrates every expert on --text): the file runs in llama.cpp and
    matches lowbit.load of it as the q4_k_m bound says."""
    from lowbit.cli import main

    model = tiny_model(case, Q4_INIT)
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text("The tower is 324 metres tall, about the same height as an 81-storey building. " * 200)
    out = tmp_path / "x.gguf"
    assert main(["quantize", str(tmp_path / "src"), "--recipe", "q4_k_m", "--method", method, "--out", str(out),
                 "--text", str(text), "--window", "64", "--calibration-windows", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"saved q4_k_m ({'rtn' if method == 'rtn' else 'awq+gptq'})" in printed
    ids = _ids()
    back = lowbit.load(out)
    err = position_errors(logits(out, ids[0]), _logits(back, ids))
    assert np.median(err) < Q4_K_M_MEDIAN and err.max() < Q4_K_M_MAX, (np.median(err), err.max())


def test_llama3_rope_read_back_from_rope_freqs_alone(tmp_path, tokenizer, monkeypatch):
    """A file as llama.cpp's converter writes Llama 3.x (rope_freqs.weight, no lowbit key): lowbit.load
    recovers the llama3 parameters from the tensor and gives transformers' logits; Llama 3.1's own
    parameters (head_dim 128, theta 500000) come back to the same frequencies."""
    from types import SimpleNamespace

    from lowbit.io.gguf import arch

    model = tiny_model("llama-rope-llama3")
    monkeypatch.setattr(arch, "LLAMA3_KEY", "general.comment")  # the writer records nothing lowbit reads back
    path = lowbit.save(model, tmp_path / "x.gguf", recipe="f32", tokenizer=tokenizer)
    monkeypatch.undo()
    ids = _ids()
    assert rel_err(_logits(lowbit.load(path), ids), _logits(model, ids)) < 1e-6
    llama31 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    freqs = arch.rope_freqs(SimpleNamespace(rope_parameters=llama31, head_dim=128))
    got = arch.llama3_from_rope_freqs(freqs, 500000.0, 128)
    assert got["factor"] == 8.0 and abs(got["low_freq_factor"] - 1.0) < 1e-3 and abs(got["high_freq_factor"] - 4.0) < 1e-3
    with pytest.raises(ValueError, match="not llama3 rope scaling"):
        arch.llama3_from_rope_freqs(np.linspace(1, 8, 64) ** 2, 500000.0, 128)


def test_cli_rtn_reads_a_bf16_folder_in_bf16(tmp_path, tokenizer, monkeypatch):
    """Round to nearest of a bf16 checkpoint holds it in bf16 (an 8B in 16 GB, not 32), and the file is
    byte for byte the one written from the same weights in float32."""
    import gguf

    from lowbit.cli import main
    from lowbit.io import models

    model = tiny_model("qwen3", Q4_INIT).to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    assert models.checkpoint_dtype(tmp_path / "src") == torch.bfloat16
    loaded = []
    real = models.load_model
    monkeypatch.setattr(lowbit.io, "load_model", lambda src, dtype=torch.float32: loaded.append(dtype) or real(src, dtype=dtype))
    assert main(["quantize", str(tmp_path / "src"), "--recipe", "q4_k_m", "--method", "rtn",
                 "--out", str(tmp_path / "x.gguf")]) == 0
    assert loaded == [torch.bfloat16]
    want = lowbit.save(model.float(), tmp_path / "y.gguf", recipe="q4_k_m", tokenizer=tokenizer)
    got = {t.name: t for t in gguf.GGUFReader(tmp_path / "x.gguf").tensors}
    for t in gguf.GGUFReader(want).tensors:
        assert got[t.name].tensor_type == t.tensor_type and np.array_equal(got[t.name].data, t.data), t.name
