"""The `rotate` transform (methods/rotate.py, pipeline/rotate.py): QuaRot/SpinQuant's R1 + R2 folded
into the weights.

Oracles: the float rotated model computes the unrotated model's logits (float32, ~1e-6 relative);
its residual stream after every block is exactly the original's times Q (hidden states, so R1 is the
rotation it says, not another equivalence); each kv head's values are the original's times R (R2).
Mutants (norms not folded, writers not rotated, o_proj columns not rotated) break the logits, and the
transform's own check refuses them. Hadamard matrices: H H^T = n I exactly, entries +-1.
"""
import copy

import numpy as np
import pytest
import torch
from test_gguf_archs import VOCAB, tiny_model, tokenizer  # noqa: F401, F811 (a fixture)

import lowbit
from lowbit.methods import parse_method, rtn
from lowbit.methods.rotate import hadamard, rotation
from lowbit.pipeline import get_recipe, quantize
from lowbit.pipeline import rotate as rot

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "smollm3")
# measured: 2e-7 .. 6e-7 relative (float32 sums in another order); a missing fold or side: > 1e-1
SAME_LOGITS = 1e-5


def _ids(n=24, seed=1):
    return torch.randint(2, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def _run(model, ids):
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
    return out.logits.double(), [h.double() for h in out.hidden_states]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _qwen2_bias(model):
    """Qwen2's q/k/v biases drawn non-zero (transformers initialises them to 0), so R2's bias path is checked."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 28, 36, 60, 64, 72, 192, 576, 896, 960, 3072, 5120])
def test_hadamard_orders_are_exact(n):
    H = hadamard(n)
    assert H is not None
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    assert torch.equal(H.abs(), torch.ones(n, n, dtype=torch.float64))


@pytest.mark.parametrize("n", [6, 10, 100, 50])
def test_other_orders_fall_back_to_a_seeded_orthogonal_matrix(n):
    assert hadamard(n) is None
    Q, what = rotation(n, seed=3)
    assert "random orthogonal" in what and str(n) in what
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, rotation(n, seed=3)[0]) and not torch.equal(Q, rotation(n, seed=4)[0])


def test_randomized_hadamard_is_signed_rows_of_h():
    Q, what = rotation(576, seed=0)
    assert what == "randomized Hadamard 576"
    H = hadamard(576) / 24.0
    signs = (Q / H)[:, 0]
    assert torch.equal(signs.abs(), torch.ones(576, dtype=torch.float64)) and (signs < 0).any() and (signs > 0).any()
    assert torch.allclose(Q, signs[:, None] * H, atol=0)


@pytest.mark.parametrize("case", ROTATABLE)
def test_rotated_model_computes_the_same_logits_with_its_residual_stream_rotated(case):
    model = tiny_model(case)
    if case == "qwen2":
        _qwen2_bias(model)
    ids = _ids()
    want, hidden = _run(model, ids)
    Q, _ = rotation(model.config.hidden_size, seed=0)
    report = rot.rotate_model(model, seed=0)
    got, hidden_rot = _run(model, ids)
    assert _rel(got, want) < SAME_LOGITS and report.error < SAME_LOGITS
    for i in range(1, len(hidden) - 1):  # each block's output (the last is the final norm's: not rotated by transformers)
        assert _rel(hidden_rot[i], hidden[i] @ Q) < SAME_LOGITS, i
    norms = [p for n, p in model.named_parameters() if n.endswith("layernorm.weight") or n == "model.norm.weight"]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)


def test_r2_rotates_each_kv_heads_values():
    model = _qwen2_bias(tiny_model("qwen2"))  # 4 query heads over 2 kv heads of 64
    seen = {}
    v = model.model.layers[1].self_attn.v_proj
    hook = v.register_forward_hook(lambda m, a, out: seen.setdefault("v", []).append(out.detach().double()))
    ids = _ids()
    want, _ = _run(model, ids)
    rot.rotate_model(model, seed=5)
    got, _ = _run(model, ids)
    hook.remove()
    R, _ = rotation(64, seed=6)  # R2 takes seed + 1
    before, after = seen["v"][0], seen["v"][-1]
    heads = before.reshape(*before.shape[:-1], 2, 64)
    assert _rel(after, (heads @ R).reshape(before.shape)) < SAME_LOGITS
    assert _rel(after, before) > 0.5  # not the identity
    assert _rel(got, want) < SAME_LOGITS


def _mutant_layout(**change):
    return rot.Layout(**{**rot.LLAMA.__dict__, **change})


@pytest.mark.parametrize("mutant", ["no norm folding", "writers left alone", "o_proj columns left alone"])
def test_mutants_change_the_logits_and_are_refused(mutant, monkeypatch):
    model = tiny_model("llama")
    ids = _ids()
    want, _ = _run(model, ids)
    if mutant == "no norm folding":
        monkeypatch.setattr(rot, "_fold_norm", lambda norm, readers: None)
    elif mutant == "writers left alone":
        monkeypatch.setitem(rot.LAYOUTS, "llama", _mutant_layout(writers=("mlp.down_proj",)))
    else:
        monkeypatch.setattr(rot, "_rotate_heads", _heads_without_o(rot._rotate_heads))
    broken = copy.deepcopy(model)
    with pytest.raises(ValueError, match="changed its logits"):
        rot.rotate_model(broken, seed=0)
    got, _ = _run(broken, ids)
    assert _rel(got, want) > 1e-2


def _heads_without_o(real):
    def heads(v, o, R, first, n_kv):
        keep = o.weight.detach().clone()
        real(v, o, R, first, n_kv)
        o.weight.data.copy_(keep)
    return heads


def test_tied_table_and_head_are_untied_unless_the_final_norm_is_constant():
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    ids = _ids()
    for constant in (False, True):
        m = copy.deepcopy(model)
        if constant:
            m.model.norm.weight.data.fill_(0.7)
        want, _ = _run(m, ids)
        report = rot.rotate_model(m, seed=0)
        assert _rel(_run(m, ids)[0], want) < SAME_LOGITS
        if constant:
            assert report.untied == 0 and m.lm_head.weight is m.model.embed_tokens.weight
            assert m.config.tie_word_embeddings and torch.all(m.model.norm.weight == 0.7)
        else:
            assert report.untied == VOCAB * 256 and m.lm_head.weight is not m.model.embed_tokens.weight
            assert not m.config.tie_word_embeddings and "+81,920 values" in report.summary()


@pytest.mark.parametrize("case, match", [("gemma2", "sandwich norms"), ("olmo2", "post-norms"),
                                         ("mixtral", "router"), ("gpt2", "LayerNorm")])
def test_unrotatable_architectures_are_refused_by_name(case, match):
    if case == "gpt2":
        from conftest import tiny_transformer
        model = tiny_transformer("gpt2", 2)
    else:
        model = tiny_model(case)
    with pytest.raises(ValueError, match=match):
        rot.rotate_model(model)


def test_method_chains_put_rotate_first():
    assert parse_method("rotate+awq+gptq") == (("rotate", "awq"), "gptq")
    assert parse_method("rotate") == (("rotate",), "rtn")
    with pytest.raises(ValueError, match="put it first"):
        parse_method("awq+rotate+gptq")
    assert get_recipe("w4g64", "rotate+auto").method == "rotate+awq+gptq"
    with pytest.raises(ValueError, match="option 'seeds'"):
        get_recipe("w4g64", "rotate+rtn").replace(method_options={"rotate": {"seeds": 1}})


@pytest.mark.parametrize("kind, outlier, most", [("hadamard", 30.0, 0.6), ("hadamard", 1.0, 1.03),
                                                  ("orthogonal", 30.0, 0.85)])
def test_rotation_spreads_outlier_columns_before_rounding(kind, outlier, most):
    """A layer x W^T with 4 input columns `outlier` times the rest, w4g64 RTN: the output error of the
    rotated layer (x Q)(W Q)^T against the plain one. Measured: Hadamard 0.51x with outliers (their
    groups' steps no longer 30x coarse), 1.00x without; a random orthogonal Q 0.78x (its entries are
    not all 1/sqrt(n): some columns keep more of an outlier)."""
    g = torch.Generator().manual_seed(0)
    scheme = get_recipe("w4g64", "rtn").weights
    W = torch.randn(128, 256, generator=g)
    W[:, :4] *= outlier
    x = torch.randn(512, 256, generator=g)
    Q = rotation(256, kind=kind)[0].float()
    plain = x @ (rtn(W, scheme).dequantize() - W).T
    rotated = (x @ Q) @ (rtn(W @ Q, scheme).dequantize() - W @ Q).T
    assert rotated.norm() < most * plain.norm(), float(rotated.norm() / plain.norm())


def _outlier_model():
    """The llama case with weight outliers: 4 input columns of every residual reader 10x the rest."""
    model = tiny_model("llama", initializer_range=0.05)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
                p[:, :4] *= 10.0
    return model


def test_calibrated_chain_runs_after_rotation():
    model, ids = _outlier_model(), _ids()
    want, _ = _run(model, ids)
    calib = [_ids(32, seed=s) for s in range(4)]
    q = quantize(copy.deepcopy(model), get_recipe("w4g64", "rotate+awq+gptq"), calibration=calib, progress=False)
    assert q.lowbit_rotation.r1 == "randomized Hadamard 256" and q.lowbit_recipe.method == "rotate+awq+gptq"
    plain = quantize(copy.deepcopy(model), get_recipe("w4g64", "rtn"), progress=False)
    assert _rel(_run(q, ids)[0], want) < _rel(_run(plain, ids)[0], want)


# -- exports: the rotated, quantized model is a plain model of its architecture --------------------------

@pytest.fixture(scope="module")
def rotated_q4(tmp_path_factory):
    """The llama case, tied and rotated (so untied), int4 groups of 32 (llama.cpp's Q4_0 layout) with
    the table and head in Q8_0's layout."""
    from test_gguf_write_quantized import Q4_0_RECIPE

    model = tiny_model("llama", initializer_range=0.05)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    return quantize(model, Q4_0_RECIPE.replace(method="rotate"), progress=False)


def test_rotated_gguf_runs_in_llama_cpp_as_in_lowbit(rotated_q4, tokenizer, tmp_path):
    import gguf
    from llama_cpp_judge import logits, rel_err

    path = lowbit.save(rotated_q4, tmp_path / "rotated.gguf", tokenizer=tokenizer)
    names = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert names["output.weight"] == names["token_embd.weight"] == "Q8_0"  # untied: its own tensor
    assert names["blk.0.attn_v.weight"] == "Q4_0"
    ids = _ids(40)[0]
    with torch.no_grad():
        in_memory = rotated_q4(ids[None]).logits[0].numpy()
        from_file = lowbit.load(path)(ids[None]).logits[0].numpy()
    assert rel_err(from_file, in_memory) < 1e-6
    assert rel_err(logits(path, ids), from_file) < 2.5e-2  # llama.cpp's q8_0 activations (test_gguf_write_quantized)


def test_rotated_model_exports_to_compressed_tensors_and_lowbit(rotated_q4, tmp_path):
    import transformers as tf

    ids = _ids(40)
    with torch.no_grad():
        want = rotated_q4(ids).logits
    ct = lowbit.save(rotated_q4, tmp_path / "ct", format="compressed-tensors")
    hf = tf.AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32)  # its config says float16
    assert not hf.config.tie_word_embeddings
    lb = lowbit.load(lowbit.save(rotated_q4, tmp_path / "lb", format="lowbit"))
    with torch.no_grad():
        for got in (hf(ids).logits, lb(ids).logits):
            assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    assert np.isfinite(want.numpy()).all()


def test_calibrated_gguf_codes_on_the_rotated_model_run_in_llama_cpp(tokenizer, tmp_path):
    from llama_cpp_judge import logits, rel_err

    from lowbit.io.gguf.calibrated import quantize_gguf

    model = tiny_model("llama", initializer_range=0.05)
    calib = [_ids(32, seed=s) for s in range(4)]
    quantize_gguf(model, "q4_0", calib, method="rotate+gptq", progress=False)
    assert model.lowbit_rotation.r1 == "randomized Hadamard 256"
    path = lowbit.save(model, tmp_path / "rotated-q4_0.gguf", tokenizer=tokenizer)
    ids = _ids(40)[0]
    with torch.no_grad():  # the writer rounds the table (q4_0) and head (q6_k): the file is its own model
        from_file = lowbit.load(path)(ids[None]).logits[0].numpy()
    blocks = lowbit.load(path).model.layers[1].mlp.down_proj.weight
    assert torch.equal(blocks, model.model.layers[1].mlp.down_proj.weight)  # GPTQ's codes on the rotated weights
    assert rel_err(logits(path, ids), from_file) < 2.5e-2


def test_rotation_is_refused_where_it_cannot_rewrite_the_whole_model():
    from lowbit.cli.common import check_method
    from lowbit.pipeline.recipe import Override

    check_method("rotate+auto")
    model = tiny_model("llama")
    r = get_recipe("w4g64", "rtn").replace(overrides=(Override("*mlp*", method="rotate+rtn"),))
    with pytest.raises(ValueError, match="rotates the whole model"):
        quantize(model, r, progress=False)
    with pytest.raises(ValueError, match="cannot run on a part"):
        quantize(model, get_recipe("w4g64", "rotate"), modules={"model.layers.0.mlp.up_proj"}, progress=False)
