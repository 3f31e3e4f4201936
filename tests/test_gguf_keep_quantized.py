"""lowbit.load(x.gguf, keep_quantized=True): q4_0 / q8_0 Linear weights as QuantLinear layers.

Each kept weight must dequantize bit for bit to the float model's weight (lowbit.load(x.gguf)), and
for llama.cpp's own q4_0 file (llama-cpp-python's quantizer) to gguf-py's dequantizer (an independent
reference); the model then runs
lowbit's packed-code kernels, whose GEMV sums in another order than F.linear: logits agree within
LOGIT_ATOL and greedy tokens are the same.
"""
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from llama_cpp_judge import quantize_file
from torch import nn

import lowbit
from lowbit.io.gguf.file import parse_gguf
from lowbit.io.gguf.arch import unpermute_rows
from lowbit.io.gguf.arch import gguf_name
from lowbit.nn.kernel_plan import plan
from lowbit.nn.linear import QuantLinear

# Logits of the 2-layer SmolLM2 reach |60|; the kernels' float32 sums differ from F.linear's by ~3e-5.
LOGIT_ATOL = 1e-3
PROMPT = "The capital of France is"


@pytest.fixture(scope="module", params=["q4_0", "q8_0"])
def lowbit_file(request, smollm2_2layers, tmp_path_factory):
    path = tmp_path_factory.mktemp("keep") / f"small-{request.param}.gguf"
    return lowbit.save(smollm2_2layers[0], path, recipe=request.param, source="smollm2-135m"), request.param


@pytest.fixture(scope="module")
def llama_cpp_q4_0(smollm2_2layers, tmp_path_factory):
    d = tmp_path_factory.mktemp("keep_llama")
    f32 = lowbit.save(smollm2_2layers[0], d / "small-f32.gguf", recipe="f32", source="smollm2-135m")
    return quantize_file(f32, d / "small-q4_0.gguf", "q4_0")


def _kept(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _check_same_model(path: Path, tok, scheme_format: str, n_layers: int = 2):
    ref, kept = lowbit.load(path), lowbit.load(path, keep_quantized=True)
    layers = _kept(kept)
    # every projection of every layer (7 each); lm_head is tied to the float embedding here
    assert len(layers) == 7 * n_layers
    want = ref.state_dict()
    for name, m in layers.items():
        assert m.qweight.scheme.format == scheme_format and m.qweight.scheme.granularity.size == 32, name
        assert m.qweight.scheme.scale_format == "fp16" and m.qweight.scales.dtype == torch.float16, name
        assert torch.equal(m.qweight.dequantize(), want[name + ".weight"]), name
        p = plan(m.qweight)
        assert p is None or p.covered, f"{name}: qmatmul has no kernel for this QTensor"
    assert not any(isinstance(m, nn.Linear) and n in layers for n, m in kept.named_modules())
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        for x in (ids, ids[:, :1]):  # several tokens (GEMV over 5 rows) and one (decode)
            torch.testing.assert_close(kept(x).logits, ref(x).logits, rtol=0, atol=LOGIT_ATOL)
        a = ref.generate(ids, max_new_tokens=8, do_sample=False)
        b = kept.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    return kept


def test_lowbit_file_keeps_q4_0_and_q8_0(lowbit_file, smollm2_2layers):
    path, recipe = lowbit_file
    _check_same_model(path, smollm2_2layers[1], {"q4_0": "int4", "q8_0": "int8"}[recipe])


def test_llama_cpp_q4_0_file(llama_cpp_q4_0, smollm2_2layers):
    model = _check_same_model(llama_cpp_q4_0, smollm2_2layers[1], "int4")
    # against gguf-py's dequantizer, rows un-permuted as transformers' q/k expect
    layers = _kept(model)
    by_key = {gguf_name(n + ".weight")[0]: n for n in layers}
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    n_q4_0 = 0
    for t in gguf.GGUFReader(llama_cpp_q4_0).tensors:
        name = by_key.get(t.name)
        if name not in layers:
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, t.name
        n_q4_0 += 1
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(layers[name].qweight.shape)
        kind = t.name.split(".")[-2]
        if kind in heads:
            w = unpermute_rows(w, heads[kind])
        assert np.array_equal(layers[name].qweight.dequantize().numpy(), w), t.name
    assert n_q4_0 == len(layers)


def test_other_types_stay_float(tmp_path, smollm2_2layers):
    path = lowbit.save(smollm2_2layers[0], tmp_path / "small-q4_1.gguf", recipe="q4_1", source="smollm2-135m")
    types = {info.type_id for info in parse_gguf(path).tensors.values()}
    assert gguf.GGMLQuantizationType.Q4_1 in types
    model = lowbit.load(path, keep_quantized=True)
    assert not _kept(model)
    ref = lowbit.load(path).state_dict()
    got = model.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_keep_quantized_is_a_gguf_option(tmp_path):
    with pytest.raises(ValueError, match=r"keep_quantized=True\): the option chooses how a \.gguf file loads"):
        lowbit.load(tmp_path / "folder", keep_quantized=True)


def test_q4_k_is_kept_within_float32_rounding_of_gguf_py(tmp_path, smollm2_2layers):
    """q4_k (Q4_K_M's main type) as uint4 with float32 scales and zeros: (q - z) * s against gguf-py's
    d sc q - dmin m, within a few float32 roundings of those two terms; then the model runs."""
    model_in, tok = smollm2_2layers
    path = lowbit.save(model_in, tmp_path / "small-q4_k.gguf", recipe="q4_k_s", source="smollm2-135m")
    ref, model = lowbit.load(path), lowbit.load(path, keep_quantized=True)
    layers = _kept(model)
    by_key = {gguf_name(n + ".weight")[0]: n for n in layers}
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    n_q4_k = 0
    for t in gguf.GGUFReader(path).tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_K:
            continue
        n_q4_k += 1
        q = layers[by_key[t.name]].qweight  # every q4_k Linear weight is kept
        assert q.scheme.format == "uint4" and q.zeros is not None and q.scales.dtype == torch.float32
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(q.shape).astype(np.float64)
        kind = t.name.split(".")[-2]
        if kind in heads:
            w = unpermute_rows(w, heads[kind])
        shift = (q.scales.double() * q.zeros.double()).abs().repeat_interleave(32, dim=1).numpy()
        err = np.abs(q.dequantize().double().numpy() - w)
        assert (err <= 2.0 ** -21 * (np.abs(w) + shift)).all(), t.name
        assert plan(q) is None or plan(q).covered
    assert n_q4_k >= 2  # the down projections (1536 wide); 576-wide rows fall back to q5_0
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        for x in (ids, ids[:, :1]):
            torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=LOGIT_ATOL)
        assert torch.equal(ref.generate(ids, max_new_tokens=8, do_sample=False),
                           model.generate(ids, max_new_tokens=8, do_sample=False))


def test_q4_k_split_matches_ggml_on_random_blocks():
    """Random q4_k blocks (every 6-bit sc and m, both nibbles) through split_blocks, against gguf-py."""
    from lowbit.io.gguf.qtensor import split_blocks, to_qtensor
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(6, 144), dtype=np.uint8)
    blocks[:, 0:4] = np.array([0.01, 0.003], dtype=np.float16).view(np.uint8)  # d, dmin: finite
    blocks[:, 4:16] |= 1  # no sub-block with sc = 0 (and m > 0), which the scheme cannot hold
    codes, scales, zeros = split_blocks(blocks.reshape(-1), "q4_k", (3, 512))
    got = to_qtensor(codes, scales, "q4_k", zeros).dequantize().double().numpy()
    want = gguf.quants.dequantize(blocks.reshape(-1), gguf.GGMLQuantizationType.Q4_K).reshape(3, 512)
    shift = np.repeat(scales.astype(np.float64) * zeros, 32, axis=1)
    assert (np.abs(got - want) <= 2.0 ** -21 * (np.abs(want) + np.abs(shift))).all()
    blocks[0, 4] = 0  # sub-block 0: sc = 0 ...
    blocks[0, 8] |= 1  # ... and m > 0: a constant -dmin m
    assert split_blocks(blocks.reshape(-1), "q4_k", (3, 512)) is None
