"""GGUF export: files llama.cpp's Python package and transformers' GGUF reader agree with.

The engine itself (llama.cpp built from source) is checked by bench/gguf_check.py, not here: CI has no
llama.cpp. References here: gguf-py (quantize, GGUFReader), transformers' GGUF loader (which undoes
llama.cpp's q/k row permutation), and the source GGUF that llama.cpp's own quantizer wrote.
"""
import copy

import gguf
import numpy as np
import pytest
import torch

import lowbit
from lowbit.io.gguf.mixtures import FILE_TYPES, file_type


def _gguf_py_roundtrip(w: torch.Tensor, name: str) -> torch.Tensor:
    qt = gguf.GGMLQuantizationType[name.upper()]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qt), qt).reshape(w.shape))


@pytest.fixture(scope="module")
def small(smollm2_2layers):
    return smollm2_2layers[0]


def test_f32_file_reads_back_as_the_same_model(small, tmp_path):
    path = lowbit.save(small, tmp_path / "m.gguf", recipe="f32", source="smollm2-135m")
    back = lowbit.load(path)
    ref = small.state_dict()
    got = back.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k  # q/k permuted on write, un-permuted by transformers on read


@pytest.mark.parametrize("recipe", ["q4_1", "q5_0"])
def test_quantized_file_reads_back_as_gguf_py_blocks(small, tmp_path, recipe):
    path = lowbit.save(small, tmp_path / f"m-{recipe}.gguf", recipe=recipe, source="smollm2-135m")
    got = lowbit.load(path).state_dict()
    for k, v in small.state_dict().items():
        if v.ndim == 1:
            assert torch.equal(got[k], v), k
        else:
            kind = "q8_0" if "embed" in k or "lm_head" in k else recipe  # tied embedding = output: llama.cpp's q6_k -> q8_0 fallback
            assert torch.equal(got[k], _gguf_py_roundtrip(v, kind)), k
    assert not list(tmp_path.glob(".*tmp*"))


def test_metadata_and_tokenizer_are_llama_cpps(small, tmp_path, smollm2_gguf):
    path = lowbit.save(small, tmp_path / "m.gguf", recipe="q8_0", source="smollm2-135m")
    ours, src = gguf.GGUFReader(str(path)), smollm2_gguf
    f = {k: v.contents() for k, v in ours.fields.items()}
    s = {k: v.contents() for k, v in src.fields.items()}
    assert f["general.architecture"] == "llama" and f["general.file_type"] == 7
    assert f["llama.block_count"] == 2
    for key in ("llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.rope.dimension_count",
                "llama.context_length", "llama.vocab_size", "llama.attention.layer_norm_rms_epsilon"):
        assert f[key] == s[key], key
    for key in s:
        if key.startswith("tokenizer."):
            assert f[key] == s[key], key
    assert {t.name for t in ours.tensors} == {t.name for t in src.tensors if not t.name.startswith("blk.")
                                              or int(t.name.split(".")[1]) < 2}


def test_tensor_types_are_llama_quantizes_choices(smollm2_gguf):
    """The source file was written by llama.cpp's quantizer as Q4_1: our rules give every tensor its type."""
    src = smollm2_gguf
    ft = file_type("q4_1")
    for t in src.tensors:
        layer = int(t.name.split(".")[1]) if t.name.startswith("blk.") else -1
        ours = (ft.tensor_type(t.name, ne0=int(t.shape[0]), layer=layer, n_layer=30, n_gqa=3, has_output=False)
                if ft.quantizes(t.name, len(t.shape)) else "f32")
        assert ours == t.tensor_type.name.lower(), t.name


def test_k_mixture_fallbacks_for_576_wide_rows():
    """llama-quant.cpp: rows not a multiple of 256 fall back to 32-blocks; ffn_down (1536 wide) keeps K."""
    ft = FILE_TYPES["q4_k_m"]
    kw = dict(n_layer=30, n_gqa=3, has_output=False)
    assert ft.tensor_type("blk.5.attn_q.weight", ne0=576, layer=5, **kw) == "q5_0"
    assert ft.tensor_type("blk.0.attn_v.weight", ne0=576, layer=0, **kw) == "q8_0"  # q6_k -> q8_0
    assert ft.tensor_type("blk.4.attn_v.weight", ne0=576, layer=4, **kw) == "q5_0"
    assert ft.tensor_type("blk.0.ffn_down.weight", ne0=1536, layer=0, **kw) == "q6_k"
    assert ft.tensor_type("blk.4.ffn_down.weight", ne0=1536, layer=4, **kw) == "q4_k"
    assert ft.tensor_type("token_embd.weight", ne0=576, layer=-1, **kw) == "q8_0"
    assert FILE_TYPES["q3_k_m"].tensor_type("blk.9.ffn_up.weight", ne0=576, layer=9, **kw) == "q4_0"


def test_suffix_picks_the_format_and_lowbit_rejects_a_gguf_recipe(small, tmp_path):
    with pytest.raises(ValueError, match="recipe"):
        lowbit.save(small, tmp_path / "out", recipe="q8_0")
    with pytest.raises(ValueError, match="unknown GGUF recipe 'q9_k'"):
        lowbit.save(small, tmp_path / "m.gguf", recipe="q9_k", source="smollm2-135m")
    assert not list(tmp_path.iterdir())


def test_q2_k_and_q3_k_s_on_256_multiple_rows():
    """llama_tensor_get_type for rows that fit 256-blocks (a 2048-wide model): q2_k keeps Q2_K for most
    tensors, raises attn_v (Q4_K when 4+ query heads share a KV head), ffn_down and attn_output to Q3_K."""
    q2, q3s = FILE_TYPES["q2_k"], FILE_TYPES["q3_k_s"]
    kw = dict(ne0=2048, layer=7, n_layer=24, has_output=True)
    for name, gqa3, gqa4 in (("blk.7.attn_q.weight", "q2_k", "q2_k"), ("blk.7.attn_v.weight", "q3_k", "q4_k"),
                             ("blk.7.ffn_down.weight", "q3_k", "q3_k"), ("blk.7.attn_output.weight", "q3_k", "q3_k"),
                             ("blk.7.ffn_up.weight", "q2_k", "q2_k"), ("output.weight", "q6_k", "q6_k"),
                             ("token_embd.weight", "q2_k", "q2_k")):
        assert (q2.tensor_type(name, n_gqa=3, **kw), q2.tensor_type(name, n_gqa=4, **kw)) == (gqa3, gqa4), name
        assert q3s.tensor_type(name, n_gqa=4, **kw) == ("q6_k" if name == "output.weight" else "q3_k"), name
    assert q2.tensor_type("blk.7.attn_q.weight", ne0=576, layer=7, n_layer=24, n_gqa=3) == "q4_0"


def test_llama_quantize_aliases():
    """llama-quantize's Q3_K, Q4_K, Q5_K are its _M mixtures (examples/quantize QUANT_OPTIONS)."""
    for alias in ("q3_k", "q4_k", "q5_k"):
        assert file_type(alias) is FILE_TYPES[alias + "_m"]
    with pytest.raises(ValueError, match="known: .*q4_k_m.*q4_k"):
        file_type("q4_k_x")


def test_q2_k_file_reads_back_as_gguf_py_blocks(small, tmp_path):
    """SmolLM2's 576-wide rows fall back to Q4_0 (embedding: Q8_0); ffn_down (1536 wide) is Q3_K."""
    path = lowbit.save(small, tmp_path / "m.gguf", recipe="q2_k", source="smollm2-135m")
    r = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q3_K" and types["blk.1.attn_q.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0" and r.fields["general.file_type"].contents() == 10
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight")
    ref = gguf.quants.dequantize(t.data, t.tensor_type)
    assert np.array_equal(lowbit.load(path).state_dict()["model.layers.1.mlp.down_proj.weight"].numpy(), ref)


def test_unknown_architecture_is_named(tmp_path):
    from conftest import tiny_transformer

    with pytest.raises(ValueError, match="'gpt2'"):
        lowbit.save(tiny_transformer("gpt2", 1), tmp_path / "m.gguf", source="smollm2-135m")
    assert not list(tmp_path.iterdir())


def test_rows_no_block_fits_name_the_tensor_and_leave_nothing(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=49152, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match=r"m.gguf: tensor 'token_embd.weight'.*not a multiple of q8_0's 32"):
        lowbit.save(model, tmp_path / "m.gguf", recipe="q4_0", source="smollm2-135m")
    assert not list(tmp_path.iterdir())


def test_tokenizer_source_must_match_the_vocabulary(tmp_path):
    from conftest import tiny_transformer

    model = copy.deepcopy(tiny_transformer("qwen2", 1))
    with pytest.raises(ValueError, match="49152 tokens, the model 100"):
        lowbit.save(model, tmp_path / "m.gguf", source="smollm2-135m")
    with pytest.raises(ValueError, match="source="):
        lowbit.save(model, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_cli_quantize_writes_a_gguf(small, tmp_path, capsys):
    from lowbit.cli import main

    src = lowbit.save(small, tmp_path / "src.gguf", recipe="f32", source="smollm2-135m")
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(src), "--recipe", "q4_0", "--method", "rtn", "--out", str(out)]) == 0
    assert "saved q4_0 (rtn)" in capsys.readouterr().out
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.1.ffn_up.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    assert main(["quantize", str(src), "--recipe", "q4_0", "--method", "hqq", "--out", str(tmp_path / "h.gguf")]) == 2
    assert "--method hqq: a .gguf --out takes auto (default), rtn" in capsys.readouterr().err
    assert main(["quantize", str(src), "--recipe", "q4_0", "--method", "rtn", "--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["quantize", str(src), "--recipe", "q4_x", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "--recipe q4_x: unknown GGUF file type" in capsys.readouterr().err


def test_writing_shows_progress_over_every_value(small, tmp_path, capsys):
    """A K-quant file of a big model takes minutes: a bar with an ETA, counted in weight values, ends at
    exactly the values written (tied table once, quantized layers by their shapes)."""
    import re

    lowbit.save(small, tmp_path / "x.gguf", recipe="q8_0", source="smollm2-135m")
    bars = re.findall(r"write q8_0: +(\d+)%\|[^|]*\| ([\d.]+[kM]?)/([\d.]+[kM]?)", capsys.readouterr().err)
    assert bars and bars[-1][0] == "100" and bars[-1][1] == bars[-1][2], bars[-1:]


def test_a_bf16_model_is_converted_one_tensor_at_a_time(small, tmp_path):
    """The writer takes float32 of one tensor when it writes it (a bf16 model is never held twice in float32),
    and the file is the one its float32 copy gives."""
    from lowbit.io.gguf.write import float_state

    half, full = copy.deepcopy(small), copy.deepcopy(small)
    for p, q in zip(half.parameters(), full.parameters()):
        p.data = p.data.to(torch.bfloat16)
        q.data = p.data.float()  # the same values in float32
    assert all(t.dtype == torch.bfloat16 for t in float_state(half).values())
    a = lowbit.save(half, tmp_path / "bf16.gguf", recipe="q4_k_m", source="smollm2-135m")
    b = lowbit.save(full, tmp_path / "f32.gguf", recipe="q4_k_m", source="smollm2-135m")
    assert a.read_bytes() == b.read_bytes()
