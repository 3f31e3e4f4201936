"""lowbit's GGUF files judged by llama.cpp (llama-cpp-python, tests/llama_cpp_judge.py): its quantizer is
the byte reference for lowbit's blocks, and its forward pass reads lowbit's f32 file as transformers
runs the model."""
import gguf
import numpy as np
import pytest
import torch
from llama_cpp_judge import logits, quantize_file, rel_err

import lowbit

# lowbit's round-to-nearest blocks and llama-quantize's type mixtures (no imatrix) claim llama.cpp's
# bytes: every tensor of the file, its type and its blocks (core/ggml_blocks.py, io/gguf/mixtures.py)
# (recipe, the GGML type most of its tensors get)
BYTE_EXACT = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_k_m": "Q4_K",
              "q6_k": "Q6_K"}
TEXT = ("The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building, and the "
        "tallest structure in Paris. Its base is square, measuring 125 metres (410 ft) on each side.")
# measured: 2-layer SmolLM2, f32 file, 60 tokens: 7.3e-7 (llama.cpp's f32 matmuls sum in another order)
F32_REL_ERR = 1e-5


@pytest.fixture(scope="module")
def f32_file(smollm2_2layers, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_cpp") / "small-f32.gguf"
    return lowbit.save(smollm2_2layers[0], path, recipe="f32", source="smollm2-135m")


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("recipe", BYTE_EXACT)
def test_blocks_equal_llama_cpps_quantizer(recipe, f32_file, smollm2_2layers, tmp_path):
    ours = _tensors(lowbit.save(smollm2_2layers[0], tmp_path / "ours.gguf", recipe=recipe, source="smollm2-135m"))
    theirs = _tensors(quantize_file(f32_file, tmp_path / "theirs.gguf", recipe))
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, (name, ours[name].tensor_type.name, t.tensor_type.name)
        assert np.asarray(ours[name].data).tobytes() == np.asarray(t.data).tobytes(), name
    assert any(t.tensor_type.name == BYTE_EXACT[recipe] for t in theirs.values())


def test_f32_file_runs_in_llama_cpp_as_in_transformers(f32_file, smollm2_2layers):
    model, tok = smollm2_2layers
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits[0].numpy()
    got = logits(f32_file, ids[0])
    assert got.shape == want.shape
    assert rel_err(got, want) < F32_REL_ERR
    assert (got.argmax(-1) == want.argmax(-1)).all()
