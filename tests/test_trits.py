"""Base-3 (TQ1_0-layout) packing of ternary codes, and binary / ternary / BitNet through lowbit.save / load."""
import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowbit
from conftest import tiny_transformer
from lowbit.core.trits import pack_trits_tq1, tq1_nbytes, unpack_trits_tq1
from lowbit.nn import BitLinear, QuantLinear


@given(st.lists(st.integers(0, 2), max_size=1200))
def test_pack_unpack_exact(trits):
    t = torch.tensor(trits, dtype=torch.uint8)
    data = pack_trits_tq1(t)
    assert data.dtype == torch.uint8 and data.numel() == tq1_nbytes(t.numel()) == 52 * -(-len(trits) // 256)
    assert torch.equal(unpack_trits_tq1(data, t.numel()), t)


def test_bytes_equal_gguf_tq1_0(gen):
    """gguf-py's TQ1_0 (llama.cpp's reference in numpy) on blocks of {-1, 0, 1} with absmax 1: its
    qs + qh bytes are ours, and its dequantize reads our bytes back to the values."""
    from gguf.quants import TQ1_0
    t = torch.randint(0, 3, (9, 256), generator=gen, dtype=torch.uint8)
    t[:, 0] = 2  # absmax 1 in every block: TQ1_0's scale d = 1, so its trits are exactly ours
    x = (t.float() - 1).numpy()
    ref = TQ1_0.quantize_blocks(x)
    ours = pack_trits_tq1(t).numpy().reshape(9, 52)
    assert np.array_equal(ref[:, :52], ours)
    blocks = np.concatenate([ours, np.tile(np.array([1.0], dtype=np.float16).view(np.uint8), (9, 1))], axis=1)
    assert np.array_equal(TQ1_0.dequantize_blocks(blocks), x)


def test_layout_by_hand():
    t = torch.ones(256, dtype=torch.uint8)  # all zeros (trit 1)
    t[0], t[32], t[160], t[240], t[244] = 2, 0, 2, 2, 0
    d = pack_trits_tq1(t)
    v0 = 2 * 81 + 0 * 27 + 1 * 9 + 1 * 3 + 1  # byte 0: trits 0, 32, 64, 96, 128
    assert int(d[0]) == -(-v0 * 256 // 243)
    assert int(d[32]) == -(-(2 * 81 + 40) * 256 // 243)  # byte 32: trits 160, 176, ..., 224
    assert int(d[48]) == -(-(2 * 81 + 0 * 27 + 9 + 3) * 256 // 243)  # qh byte 0: trits 240, 244, 248, 252


def test_bad_codes_rejected():
    with pytest.raises(ValueError, match="ternary codes 0..2"):
        pack_trits_tq1(torch.tensor([0, 3], dtype=torch.uint8))
    with pytest.raises(ValueError, match="need 52"):
        unpack_trits_tq1(torch.zeros(51, dtype=torch.uint8), 10)


def test_real_weights_round_trip(smollm2_weights):
    w = smollm2_weights["blk.0.ffn_down.weight"]
    q = lowbit.quantize_tensor(w, "ternary")
    codes = q.unpack_codes()
    assert torch.equal(unpack_trits_tq1(pack_trits_tq1(codes), codes.numel()).reshape(codes.shape), codes)
    assert 8 * pack_trits_tq1(codes).numel() / codes.numel() == pytest.approx(1.625)


@pytest.mark.parametrize("recipe, cls", [("bitnet", BitLinear), ("ternary", QuantLinear), ("binary", QuantLinear)])
def test_save_load_identity(recipe, cls, tmp_path):
    model = tiny_transformer("qwen2", 2)
    q = lowbit.quantize(copy.deepcopy(model), recipe, progress=False)
    lowbit.save(q, tmp_path / "m")
    back = lowbit.load(tmp_path / "m")
    pairs = [(n, m, back.get_submodule(n)) for n, m in q.named_modules() if isinstance(m, QuantLinear)]
    assert len(pairs) == 14
    for name, a, b in pairs:
        assert type(b) is cls and type(a) is cls, name
        assert torch.equal(a.qweight.codes, b.qweight.codes) and torch.equal(a.qweight.scales, b.qweight.scales)
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(back(x).logits, q(x).logits)
    meta = json.loads((tmp_path / "m" / "lowbit.json").read_text())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        codes = f.get_tensor("model.layers.0.mlp.up_proj.qweight.codes")
    n = 128 * 64
    entry = meta["modules"]["model.layers.0.mlp.up_proj"]
    if recipe == "binary":
        assert codes.numel() == n // 8 and "codes_layout" not in entry
    else:  # 5 trits per byte on disk
        assert entry["codes_layout"] == "tq1_0" and codes.numel() == tq1_nbytes(n) == n * 13 // 64  # 1.625 bits


def test_corrupt_ternary_codes_named(tmp_path):
    from safetensors.torch import load_file, save_file
    q = lowbit.quantize(tiny_transformer("qwen2", 1), "ternary", progress=False)
    lowbit.save(q, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(f))
    key = "model.layers.0.mlp.up_proj.qweight.codes"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match="up_proj.qweight.codes.*tq1_0"):
        lowbit.load(tmp_path / "m")
