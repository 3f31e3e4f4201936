"""The memory calculator counts bytes exactly as lowbit stores them, from shapes alone."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_transformer
from lowbit.analysis import memory_table
from lowbit.analysis.memory import weight_row
from lowbit.analysis.shapes import model_shapes, parse_size
from lowbit.cli import main
from lowbit.core import PerChannel, PerGroup, PerTensor, Scheme, quantize
from lowbit.core.layout import qtensor_layout
from lowbit.core.scheme import SCHEMES
from lowbit.eval import model_size
from lowbit.nn import cache_keyword
from lowbit.pipeline import quantize as quantize_model
from lowbit.pipeline.recipe import RECIPES

LAYOUT_SCHEMES = [*SCHEMES.values(), *(r.weights for r in RECIPES.values()), RECIPES["w4g64"].embeddings,
                  Scheme("kmeans3", PerGroup(16)), Scheme("fp8_e4m3", PerTensor()), Scheme("int4", PerChannel(1)),
                  Scheme("int8", PerGroup(32, axis=0), scale_format="bf16"), Scheme("fp4_e2m1", PerGroup(32),
                                                                                     scale_format="e8m0")]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), k=st.integers(0, len(LAYOUT_SCHEMES) - 1))
def test_layout_has_the_bytes_quantize_stores(rows, cols, k):
    scheme = LAYOUT_SCHEMES[k]
    q = quantize(torch.randn(rows, cols), scheme)
    assert qtensor_layout((rows, cols), scheme).nbytes == q.nbytes


RECIPES_CHECKED = ["w4g64", "nf4-dq", "nvfp4", "w8a8-dynamic", "w2g64"]


def test_weights_equal_the_size_of_quantized_copies(smollm2_2layers):
    model, _ = smollm2_2layers
    shapes = model_shapes(model)
    assert weight_row(shapes, "fp32").weights_bytes == model_size(model).bytes
    for name in RECIPES_CHECKED:
        q = quantize_model(copy.deepcopy(model), name, progress=False)
        size, row = model_size(q), weight_row(shapes, name)
        assert row.weights_bytes == size.bytes, name
        assert row.embedding_bytes == size.embedding_bytes + size.lm_head_bytes, name


@pytest.mark.parametrize("arch", ["bert", "qwen2"])
def test_weights_equal_on_an_encoder_and_an_untied_head_with_static_activations(arch):
    model = tiny_transformer(arch, 2)
    shapes = model_shapes(model)
    calib = [torch.randint(0, 100, (1, 16)) for _ in range(2)]
    for name in ("w4g64", "nf4", "w8a8-static"):
        q = quantize_model(copy.deepcopy(model), name, calibration=calib, progress=False)
        assert weight_row(shapes, name).weights_bytes == model_size(q).bytes, (arch, name)


def test_textbook_arithmetic_for_an_8b_model():
    t = memory_table("8B", ["fp32", "bf16", "w4g64-sym"], train=["adamw", "adamw8bit", "qlora"])
    fp32, bf16, w4 = t.rows
    assert t.params == 8_030_261_248  # Llama 3.1 8B
    assert fp32.weights_bytes - 4 * t.params < 1024 and abs(fp32.weights_bytes / 1e9 - 32.12) < 0.01
    assert abs(bf16.weights_bytes / 1e9 - 16.06) < 0.01
    assert 4.0e9 < w4.weights_bytes < 5.0e9  # 4.25 bits in the blocks, 8.5 in the embedding and head
    adamw, adam8, qlora = t.training
    assert abs(adamw.bytes_per_param - 16) < 1e-6
    assert abs(adam8.bytes_per_param - 6) < 0.05
    assert qlora.total_bytes < w4.weights_bytes * 1.5 and qlora.trainable_params < t.params / 100


def test_kv_cache_matches_a_real_cache(smollm2_2layers):
    model, _ = smollm2_2layers
    ids = torch.arange(7)[None].repeat(2, 1)
    with torch.no_grad():
        cache = getattr(model(ids, use_cache=True), cache_keyword(model))
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    t = memory_table(model, ["fp32"], context=7, batch=2, kv_dtype="fp32")
    assert t.rows[0].kv_cache_bytes == real
    assert memory_table(tiny_transformer("bert", 2), ["fp32"], context=7).rows[0].kv_cache_bytes == 0


def test_checkpoints_are_counted_from_headers(smollm2_full, tmp_path):
    from safetensors.torch import save_file

    from lowbit.io import load_model

    gguf = memory_table("smollm2-135m", ["fp32"])
    assert gguf.rows[0].weights_bytes == model_size(smollm2_full[0]).bytes
    minilm = memory_table("minilm-l6", ["fp32", "w4g64"])
    assert minilm.rows[0].weights_bytes == model_size(load_model("minilm-l6")[0]).bytes
    # a bare safetensors file: 2-D weights become Linear layers under the same names
    model = tiny_transformer("qwen2", 2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    bare = memory_table(tmp_path / "m.safetensors", ["w4g64"]).rows[0]
    assert bare.quantized_bytes == weight_row(model_shapes(model), "w4g64").quantized_bytes


def test_sizes_bad_input_and_cli(capsys):
    assert parse_size("70B") == 70e9 and parse_size("135m") == 135e6 and parse_size("w4g64") is None
    square = memory_table("2B", ["bf16"]).rows[0]
    assert square.embedding_bytes == 0 and abs(square.params - 2e9) < 4096**2
    with pytest.raises(ValueError, match="neither a built-in"):
        memory_table("no-such-model")
    with pytest.raises(ValueError, match="train='sgd'"):
        memory_table("8B", ["bf16"], train=["sgd"])
    with pytest.raises(ValueError, match="unknown recipe"):
        memory_table("8B", ["w5"])
    assert main(["memory", "8B", "--recipe", "fp32,w4g64", "--context", "8192", "--train", "adamw"]) == 0
    out = capsys.readouterr().out
    assert "32.1210" in out and "2 x 32 layers x 8 KV heads x 128 head dim x 8192 tokens" in out and "16.00" in out


def test_saved_checkpoints_hold_the_counted_bytes(tmp_path):
    """lowbit.save's safetensors tensors add up to the row, less the buffers only held in memory (RoPE)."""
    import math

    import lowbit
    from lowbit.analysis.shapes import safetensors_header

    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I32": 4, "I64": 8}
    model = tiny_transformer("qwen2", 2)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    for name in ("w4g64", "nf4-dq", "nvfp4"):
        folder = lowbit.save(quantize_model(copy.deepcopy(model), name, progress=False), tmp_path / name)
        saved = sum(math.prod(shape) * itemsize[dt] for f in sorted(folder.glob("*.safetensors"))
                    for shape, dt in safetensors_header(f).values())
        assert saved == weight_row(model_shapes(model), name).weights_bytes - buffers, name
