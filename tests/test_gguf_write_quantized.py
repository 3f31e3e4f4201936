"""A model quantized by a lowbit recipe, saved as .gguf (io/gguf/write.py, gguf/qtensor.join_blocks).

Every quantized layer is in the file, the embedding table included (a QuantEmbedding's QTensor lives
outside state_dict); a QTensor that a GGML block type holds exactly is written as it is (its codes
and scales, checked against gguf-py's dequantizer bit for bit); the others are rounded again with
one warning that counts them. llama.cpp (tests/llama_cpp_judge.py) loads and runs each file.
"""
import copy
import warnings

import gguf
import numpy as np
import pytest
import torch
from llama_cpp_judge import logits, rel_err

import lowbit
from lowbit.core import Scheme
from lowbit.core.granularity import PerChannel, PerGroup, PerTensor
from lowbit.core.packing import pack_bits_le
from lowbit.core.qtensor import QTensor
from lowbit.io.gguf.qtensor import join_blocks
from lowbit.io.gguf.arch import unpermute_rows
from lowbit.io.gguf.arch import gguf_name
from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.pipeline.recipe import EMBEDDINGS_8BIT, Recipe

TEXT = "The capital of France is Paris. It is known for the Eiffel Tower, built in 1889 for the World's Fair."
# int4 groups of 32 with fp16 scales: llama.cpp's Q4_0; the tied embedding table / output in Q8_0's layout
Q4_0_RECIPE = Recipe(Scheme("int4", PerGroup(32), scale_format="fp16"), embeddings=EMBEDDINGS_8BIT,
                     output=EMBEDDINGS_8BIT)
# measured on the 2-layer SmolLM2, 29 tokens (relative 2-norm error of each position's logits, the largest):
#   the file in lowbit (lowbit.load: float weights) vs the quantized model in memory: 0 (exact blocks),
#   1.3e-4 (w4g64 rounded to f16)
#   llama.cpp vs lowbit on the same file: 1.5e-2 (q4_0/q8_0 blocks: llama.cpp rounds the activations to
#   q8_0 blocks for its quantized matmuls; 0.9e-2 on lowbit's plain q8_0 file), 5.3e-3 (w4g64: f16
#   weights, a q8_0 table). For scale: the q4_0 model against the float model differs by 7.9e-2.
SAME_WEIGHTS = 1e-6
LLAMA_CPP_Q8_ACTIVATIONS = 2.5e-2


def _quantized(model, recipe):
    q = copy.deepcopy(model)
    lowbit.quantize(q, recipe, progress=False)
    return q


@pytest.fixture(scope="module")
def q4_0_model(smollm2_2layers):
    return _quantized(smollm2_2layers[0], Q4_0_RECIPE)


@pytest.fixture(scope="module")
def q4_0_file(q4_0_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("quantized") / "small-w4g32sym.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer maps exactly: nothing to warn about
        return lowbit.save(q4_0_model, path, source="smollm2-135m")


def _qtensors(model) -> dict:
    """{GGUF name: QTensor} of the quantized layers (a tied head shares the table's QTensor: the table's name)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            out.setdefault(id(m.qweight), (gguf_name(name + ".weight")[0], m.qweight))
    return dict(out.values())


def _file_values(t, config) -> np.ndarray:
    """gguf-py's dequantized tensor in transformers' row order (q/k un-permuted)."""
    w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.data.shape[0], -1)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(t.name.split(".")[-2])
    return unpermute_rows(w, heads) if heads else w


def test_quantized_model_keeps_its_embedding_table_and_codes(q4_0_model, q4_0_file):
    tensors = {t.name: t for t in gguf.GGUFReader(q4_0_file).tensors}
    assert "token_embd.weight" in tensors and "output.weight" not in tensors  # tied: one table
    qtensors = _qtensors(q4_0_model)
    assert len(qtensors) == 2 * 7 + 1
    for name, q in qtensors.items():
        t = tensors[name]
        assert t.tensor_type.name == ("Q8_0" if name == "token_embd.weight" else "Q4_0"), name
        assert np.array_equal(_file_values(t, q4_0_model.config), q.dequantize().numpy()), name
    # and read back kept quantized: the same codes and scales, not values that happen to agree
    back = lowbit.load(q4_0_file, keep_quantized=True)
    kept = {name: m.qweight for name, m in back.named_modules() if isinstance(m, QuantLinear)}
    assert len(kept) == 2 * 7
    for name, k in kept.items():
        q = q4_0_model.get_submodule(name).qweight
        assert torch.equal(k.unpack_codes(), q.unpack_codes()) and torch.equal(k.scales, q.scales), name


def test_llama_cpp_runs_the_quantized_file(q4_0_model, q4_0_file, smollm2_2layers):
    ids = smollm2_2layers[1](TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        in_memory = q4_0_model(ids).logits[0].numpy()
        from_file = lowbit.load(q4_0_file)(ids).logits[0].numpy()
    assert rel_err(from_file, in_memory) < SAME_WEIGHTS
    assert rel_err(logits(q4_0_file, ids[0]), from_file) < LLAMA_CPP_Q8_ACTIVATIONS


def test_other_schemes_are_rounded_again_with_one_warning(smollm2_2layers, tmp_path):
    """w4g64: uint4 with integer zero points in groups of 64, which no GGML type holds exactly (q4_1
    stores a minimum d q + m, and m = -z d is rarely an fp16 value); its embedding table is int8 g32."""
    model = _quantized(smollm2_2layers[0], "w4g64")
    with pytest.warns(UserWarning, match=r"14 quantized tensor\(s\) have no GGML block type") as record:
        path = lowbit.save(model, tmp_path / "small-w4g64.gguf", source="smollm2-135m")
    assert len([w for w in record if "GGUF export" in str(w.message)]) == 1
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "F16"
    ids = smollm2_2layers[1](TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        in_memory = model(ids).logits[0].numpy()
        from_file = lowbit.load(path)(ids).logits[0].numpy()
    assert rel_err(from_file, in_memory) < 1e-3  # the weights rounded to f16
    assert rel_err(logits(path, ids[0]), from_file) < LLAMA_CPP_Q8_ACTIVATIONS


def _random_qtensor(fmt: str, bits: int, group, zero: float | None, scale_format="fp16") -> QTensor:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (8, 128), dtype=torch.uint8, generator=g)
    n = {PerTensor: 1, PerChannel: 8}.get(type(group))
    shape = (n,) if n == 8 else () if n == 1 else (8, 128 // group.size)
    scales = (torch.rand(shape, generator=g) * 0.1 - 0.05).to(torch.float16 if scale_format == "fp16" else torch.float32)
    zeros = None if zero is None else torch.full(shape, zero, dtype=scales.dtype)
    scheme = Scheme(fmt, group, symmetric=zero is None, scale_format=scale_format,
                    range="absmax" if zero is None else "minmax")
    return QTensor(pack_bits_le(codes, bits), (8, 128), scheme, scales=scales, zeros=zeros)


@pytest.mark.parametrize("fmt, bits, group, zero, kind", [
    ("int8", 8, PerGroup(32), None, "Q8_0"), ("int8", 8, PerChannel(0), None, "Q8_0"),
    ("int4", 4, PerGroup(32), None, "Q4_0"), ("int4", 4, PerGroup(64), None, "Q4_0"),
    ("int4", 4, PerTensor(), None, "Q4_0"), ("int5", 5, PerGroup(32), None, "Q5_0"),
    ("uint4", 4, PerGroup(32), 8.0, "Q4_1"), ("uint5", 5, PerGroup(64), 16.0, "Q5_1")])
def test_join_blocks_matches_gguf_py(fmt, bits, group, zero, kind):
    """Codes, negative scales and zero points (powers of two, so m = -z d is an fp16 value) as blocks
    that gguf-py dequantizes to QTensor.dequantize() bit for bit."""
    q = _random_qtensor(fmt, bits, group, zero)
    got_kind, blocks = join_blocks(q)
    assert got_kind == kind.lower()
    want = gguf.quants.dequantize(blocks.reshape(-1), gguf.GGMLQuantizationType[kind]).reshape(q.shape)
    assert np.array_equal(want, q.dequantize().numpy())


def test_join_blocks_refuses_what_no_block_holds():
    assert join_blocks(_random_qtensor("int4", 4, PerGroup(16), None)) is None  # two scales per block
    assert join_blocks(_random_qtensor("uint4", 4, PerGroup(32), 3.0)) is None  # m = -3 d: not all fp16
    wide = _random_qtensor("int8", 8, PerChannel(0), None, scale_format="fp32")
    assert join_blocks(wide) is None  # fp32 scales that fp16 cannot hold
    wide.scales = wide.scales.half().float()
    assert join_blocks(wide)[0] == "q8_0"  # fp32 scales that happen to be fp16 values
    nf4 = QTensor(torch.zeros(64, dtype=torch.uint8), (4, 32), Scheme("nf4", PerGroup(32)), scales=torch.ones(4, 1))
    assert join_blocks(nf4) is None
