"""Quantized embedding tables and output layers: row lookups, tied weights, save/load, size."""
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

import lowbit
from conftest import tiny_transformer
from lowbit.core import SCHEMES, PerChannel, PerGroup, PerTensor, Scheme, quantize
from lowbit.eval import linear_bits_per_weight, model_size
from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.pipeline import Recipe, get_recipe

INT8_ROW = Scheme("int8", PerChannel(0), scale_format="fp16")
ROW_SCHEMES = {
    "int8 per row": INT8_ROW,
    "int6 g64": Scheme("int6", PerGroup(64), scale_format="fp16"),
    "uint4 affine g64 integer zero": Scheme("uint4", PerGroup(64), symmetric=False, range="minmax",
                                            scale_format="fp16", integer_zero=True),
    "int3 g32 (rows of 3 x 96 bits)": Scheme("int3", PerGroup(32)),
    "ragged int5 g40": Scheme("int5", PerGroup(40)),
    "int4 per tensor": Scheme("int4", PerTensor()),
    "nf4": SCHEMES["nf4"],
    "nf4-dq (double-quantized scales)": SCHEMES["nf4-dq"],
    "nvfp4 (tensor scale)": SCHEMES["nvfp4"],
    "mxfp4 (e8m0)": SCHEMES["mxfp4"],
    "fp8 per row": Scheme("fp8_e4m3", PerChannel(0)),
    "kmeans3 per row": Scheme("kmeans3", PerChannel(0)),
}


@pytest.mark.parametrize("scheme", ROW_SCHEMES.values(), ids=ROW_SCHEMES.keys())
def test_lookup_equals_dequantize_then_index(scheme, gen):
    table = torch.randn(300, 96, generator=gen) * torch.rand(300, 1, generator=gen) * 3
    q = quantize(table, scheme)
    ids = torch.randint(0, 300, (3, 17), generator=gen)
    ids[0, :3] = torch.tensor([0, 299, 0])  # first, last, repeated rows
    got = QuantEmbedding(q)(ids)
    assert got.shape == (3, 17, 96)
    assert torch.equal(got, q.dequantize()[ids])


@given(rows=st.integers(1, 40), groups=st.integers(1, 5), size=st.sampled_from([8, 16, 32]),
       bits=st.integers(2, 8), n=st.integers(1, 30), seed=st.integers(0, 2**31 - 1))
def test_rows_equal_dequantize_then_index_property(rows, groups, size, bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    q = quantize(torch.randn(rows, groups * size, generator=g), Scheme(f"int{bits}", PerGroup(size)))
    ids = torch.randint(0, rows, (n,), generator=g)
    assert torch.equal(q.rows(ids).dequantize(), q.dequantize()[ids])


def test_lookup_on_smollm2_embedding_rows(smollm2_full):
    model, tok = smollm2_full
    table = model.model.embed_tokens.weight.detach()[:4096]
    q = quantize(table, INT8_ROW)
    ids = tok("Quantized embeddings read only the rows they need.", return_tensors="pt")["input_ids"] % 4096
    assert torch.equal(QuantEmbedding(q)(ids), q.dequantize()[ids])
    # int8 per row is close to the table: the error is at most half a step of each row
    step = q.scale_values()[ids].unsqueeze(-1)
    assert ((QuantEmbedding(q)(ids) - table[ids]).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("scheme", [Scheme("int8", PerChannel(1)), Scheme("int4", PerGroup(16, axis=0))],
                         ids=["per column", "groups down the columns"])
def test_schemes_without_row_scales_are_refused(scheme):
    q = quantize(torch.randn(64, 32), scheme)
    with pytest.raises(ValueError, match="PerGroup"):
        QuantEmbedding(q)
    with pytest.raises(ValueError, match="embeddings"):
        Recipe(get_recipe("w4g64").weights, embeddings=scheme)


def test_recipe_json_round_trip_keeps_embedding_and_output_schemes():
    r = get_recipe("w4g64").replace(embeddings=INT8_ROW, output=Scheme("int6", PerGroup(64), scale_format="fp16"))
    back = Recipe.from_json(r.to_json())
    assert back == r and back.embeddings == INT8_ROW and back.output.format == "int6"
    old = r.to_dict()
    del old["embeddings"], old["output"]  # a recipe saved before these fields existed
    assert Recipe.from_dict(old).embeddings is None


def _tied_w4(model):
    q = copy.deepcopy(model)
    lowbit.quantize(q, get_recipe("w4g64", "rtn").replace(embeddings=INT8_ROW, output=None), progress=False)
    return q


def test_tied_table_is_one_qtensor_saved_once_and_reloaded_exactly(smollm2_2layers, tmp_path):
    model, tok = smollm2_2layers
    assert model.lm_head.weight is model.model.embed_tokens.weight
    q = _tied_w4(model)
    emb, head = q.model.embed_tokens, q.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert head.qweight is emb.qweight
    lowbit.save(q, tmp_path / "ck", tokenizer=tok)
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert [k for k in keys if k.startswith("model.embed_tokens.")] == \
        ["model.embed_tokens.qweight.codes", "model.embed_tokens.qweight.scales"]
    assert not [k for k in keys if k.startswith("lm_head")]
    back = lowbit.load(tmp_path / "ck")
    assert back.lm_head.qweight is back.model.embed_tokens.qweight
    ids = tok("The tied table serves the lookup and the head.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)
    assert model_size(back).bytes == model_size(q).bytes


def test_size_drops_by_the_table_and_counts_it_once(smollm2_2layers):
    model, _ = smollm2_2layers
    fp_table = get_recipe("w4g64", "rtn").replace(embeddings=None, output=None)
    plain = lowbit.quantize(copy.deepcopy(model), fp_table, progress=False)
    tied = _tied_w4(model)
    table = tied.model.embed_tokens.qweight
    before, after = model_size(plain), model_size(tied)
    vocab, dim = model.model.embed_tokens.weight.shape
    assert before.embedding_bytes == vocab * dim * 4
    assert after.embedding_bytes == table.nbytes == vocab * dim + vocab * 2  # int8 codes + fp16 scale per row
    assert before.bytes - after.bytes == vocab * dim * 4 - table.nbytes
    assert after.lm_head_tied and after.lm_head_bytes == 0 and after.weights == before.weights
    assert linear_bits_per_weight(tied) == linear_bits_per_weight(plain) == 4.5
    # the shipped w4g64 stores the table as int8 groups of 32 (8.5 bits), one QTensor for table and head
    default = lowbit.quantize(copy.deepcopy(model), get_recipe("w4g64", "rtn"), progress=False)
    assert model_size(default).embedding_bytes == vocab * dim + (vocab * dim // 32) * 2
    assert default.lm_head.qweight is default.model.embed_tokens.qweight


def test_untied_embeddings_and_head_take_their_own_schemes(tmp_path):
    model = tiny_transformer("qwen2", 1)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    int6 = Scheme("int6", PerGroup(32), scale_format="fp16")
    r = get_recipe("w8").replace(embeddings=INT8_ROW, output=int6)
    q = lowbit.quantize(copy.deepcopy(model), r, progress=False)
    assert q.model.embed_tokens.qweight.scheme == INT8_ROW and q.lm_head.qweight.scheme == int6
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(ids).logits, q(ids).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    size = model_size(q)
    assert size.embedding_bytes == q.model.embed_tokens.qweight.nbytes
    assert size.lm_head_bytes == q.lm_head.qweight.nbytes and not size.lm_head_tied
    lowbit.save(q, tmp_path / "ck")
    back = lowbit.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, got)


def test_tied_table_with_two_different_schemes_is_refused():
    model = tiny_transformer("gpt2", 1)
    r = get_recipe("w8").replace(embeddings=INT8_ROW, output=Scheme("int6", PerGroup(32)))
    with pytest.raises(ValueError, match="tied"):
        lowbit.quantize(model, r, progress=False)


def test_head_both_in_include_and_output_is_refused():
    model = tiny_transformer("qwen2", 1)
    r = get_recipe("w8").replace(exclude=("*embed*",), output=INT8_ROW)
    with pytest.raises(ValueError, match="lm_head"):
        lowbit.quantize(model, r, progress=False)
    assert isinstance(model.lm_head, torch.nn.Linear)  # refused before anything changed
