"""Quantizing real transformers models (truncated SmolLM2, MiniLM, tiny GPT-2 and Qwen2)."""
import copy

import pytest
import torch

import lowbit
from lowbit.eval import model_size
from lowbit.io import load_model
from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.pipeline import RECIPES, get_recipe

from conftest import tiny_transformer


@pytest.fixture(scope="module")
def smollm2_2l(smollm2_2layers):
    return smollm2_2layers


@pytest.fixture(scope="module")
def ids(smollm2_2l):
    _, tok = smollm2_2l
    text = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 8
    return tok(text, return_tensors="pt").input_ids[:, :96]


@pytest.mark.parametrize("recipe,method", [(r, None) for r in RECIPES] + [("w4g64", "hqq"), ("w4g64", "mse")])
def test_every_recipe_on_truncated_smollm2(smollm2_2l, ids, recipe, method):
    model, _ = smollm2_2l
    q = copy.deepcopy(model)
    lowbit.quantize(q, recipe, calibration=[ids[:, :48], ids[:, 48:]], method=method, progress=False)
    n_q = sum(isinstance(m, QuantLinear) for n, m in q.named_modules() if ".layers." in n)
    assert n_q == 14  # 7 projections x 2 layers
    # the tied embedding table and lm_head: one QTensor when the recipe quantizes them, else full precision
    table = get_recipe(recipe, method).embeddings
    assert getattr(q.lm_head, "qweight", None) is getattr(q.model.embed_tokens, "qweight", None)
    assert isinstance(q.lm_head, QuantLinear if table else torch.nn.Linear)
    with torch.no_grad():
        ref, out = model(ids).logits, q(ids).logits
    agree = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    # per-tensor static int8 activations are coarse on an LLM (SmoothQuant's motivation)
    floor = (0.85 if "static" in recipe else 0.97 if recipe.startswith(("w8", "fp8"))
             else 0.3 if recipe.startswith("w2") else 0.6)
    # post-training binary/ternary weights collapse (measured agreement: binary 0.08, ternary 0.29, bitnet 0.15;
    # a wrong scale or sign gives about 0)
    floor = {"binary": 0.04, "ternary": 0.15, "bitnet": 0.07}.get(recipe, floor)
    assert agree > floor, agree


def test_hqq_beats_rtn_on_every_layer(smollm2_2l):
    model, _ = smollm2_2l
    scheme = lowbit.pipeline.get_recipe("w4g64", "hqq").weights  # float zeros, output-axis groups
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers" in name:
            w = m.weight.detach()
            e_rtn = lowbit.error_stats(w, lowbit.core.quantize(w, scheme)).mse
            e_hqq = lowbit.error_stats(w, lowbit.methods.hqq(w, scheme)).mse
            assert e_hqq < e_rtn * 0.95, name


def test_generate_runs_after_quantization(smollm2_2l, ids):
    model, tok = smollm2_2l
    q = lowbit.quantize(copy.deepcopy(model), "w8a8-dynamic", progress=False)
    out = q.generate(ids[:, :10], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 15)


def test_size_report_matches_the_bytes_held(smollm2_2l):
    model, _ = smollm2_2l
    q = lowbit.quantize(copy.deepcopy(model), "w4g64", progress=False)
    held = {}
    for m in q.modules():
        tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if isinstance(m, (QuantLinear, QuantEmbedding)):  # the tied table's QTensor: one storage, once
            qt = m.qweight
            tensors += [t for t in (qt.codes, qt.scales, qt.zeros) if t is not None]
        for t in tensors:
            held[(t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())] = t.numel() * t.element_size()
    assert model_size(q).bytes == sum(held.values())
    linears = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n)
    qbytes = sum(m.qweight.nbytes for n, m in q.named_modules() if isinstance(m, QuantLinear) and ".layers." in n)
    assert qbytes == linears // 2 + (linears // 64) * 2 * 2  # 4-bit codes + fp16 scale and zero per 64


def test_save_load_round_trip_is_bit_identical(smollm2_2l, ids, tmp_path):
    model, tok = smollm2_2l
    for recipe in ["w4g64", "w8a8-static", "nf4-dq"]:
        q = lowbit.quantize(copy.deepcopy(model), recipe, calibration=[ids], progress=False)
        lowbit.save(q, tmp_path / recipe, tokenizer=tok, source="smollm2-135m")
        back = lowbit.load(tmp_path / recipe)
        with torch.no_grad():
            assert torch.equal(back(ids).logits, q(ids).logits), recipe
        assert model_size(back).bytes == model_size(q).bytes


def test_minilm_w8a8_keeps_sentence_embeddings():
    from lowbit.eval import embedding_fidelity

    model, tok = load_model("minilm-l6")
    q = lowbit.quantize(copy.deepcopy(model), "w8a8-dynamic", progress=False)
    sentences = [f"Sentence number {i} talks about {w} and the weather in spring." for i, w in
                 enumerate(["rivers", "trains", "music", "bread", "chess", "stars", "laws", "birds"])]
    fid = embedding_fidelity(q, model, tok, sentences)
    assert fid.cosine > 0.99 and fid.spearman > 0.95


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "bert"])
def test_other_architectures_from_config(arch):
    model = tiny_transformer(arch, layers=2)
    x = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        ref = model(x)[0]
    q = lowbit.quantize(copy.deepcopy(model), "w8", progress=False)
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) >= 8
    with torch.no_grad():
        out = q(x)[0]
    assert ((out - ref).norm() / ref.norm()) < 0.02
