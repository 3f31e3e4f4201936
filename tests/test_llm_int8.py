"""LLM.int8(): outlier columns in full precision, the rest W8A8 (int8 per token x int8 per channel)."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.core import Scheme
from lowbit.core.granularity import PerChannel, PerGroup, PerToken
from lowbit.eval import model_size
from lowbit.methods import rtn
from lowbit.methods.llm_int8 import decompose, outlier_columns
from lowbit.nn import LLMInt8Linear, QuantLinear, outlier_stats
from lowbit.pipeline import RECIPES, Override, Recipe

W8, A8 = Scheme("int8", PerChannel(0)), Scheme("int8", PerToken())


def make(threshold, gen, k=64, n=48):
    w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    q = rtn(w, W8)
    return LLMInt8Linear(q, b, act_scheme=A8, threshold=threshold), QuantLinear(q, b, act_scheme=A8)


def with_outliers(gen, t=10, k=64, cols=(3, 10, 40), value=20.0):
    x = torch.randn(t, k, generator=gen)
    for i, c in enumerate(cols):
        x[i % t, c] = value * (-1) ** i  # one outlier in one row makes the whole column full precision
    return x


def test_infinite_threshold_is_plain_vectorwise_int8(gen):
    m, plain = make(math.inf, gen)
    x = with_outliers(gen)[None].repeat(2, 1, 1)
    assert torch.equal(m(x), plain(x))
    assert m.outlier_columns == 0 and m.columns == 64


def test_threshold_zero_is_full_precision_with_dequantized_weights(gen):
    m, _ = make(0.0, gen)
    x = with_outliers(gen)
    assert torch.equal(m(x), F.linear(x, m.qweight.dequantize(), m.bias))
    assert outlier_stats(m).share == 1.0


def test_mixed_decomposition_matches_a_float64_reference(gen):
    m, plain = make(6.0, gen)
    x = with_outliers(gen)
    cols = [3, 10, 40]
    wd = m.qweight.dequantize().double()
    xd = x.double()
    regular = [c for c in range(64) if c not in cols]
    s = xd[:, regular].abs().amax(1, keepdim=True) / 127  # row scales over the regular columns only
    xq = torch.zeros_like(xd)
    xq[:, regular] = torch.round(xd[:, regular] / s).clamp(-127, 127) * s
    ref = xq @ wd.T + xd[:, cols] @ wd[:, cols].T + m.bias.double()
    out = m(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    exact = xd @ wd.T + m.bias.double()
    err, err_plain = (out.double() - exact)[:3].norm(), (plain(x).double() - exact)[:3].norm()
    assert err < err_plain / 5  # rows 0-2 hold the outliers: they no longer flatten those rows' int8 grids


def test_outlier_columns_and_share_on_a_constructed_input(gen):
    x = torch.zeros(4, 10)
    x[0, 1], x[3, 1], x[2, 7], x[1, 4] = 7.0, -9.0, -6.0, 5.99  # |x| >= 6 counts (bitsandbytes' rule)
    assert outlier_columns(x, 6.0).tolist() == [1, 7]
    reg, out = decompose(x, outlier_columns(x, 6.0))
    assert reg[:, [1, 7]].abs().sum() == 0 and reg[1, 4] == 5.99 and out.shape == (4, 2)

    model = torch.nn.Sequential(make(6.0, gen)[0], torch.nn.ReLU(), make(6.0, gen, k=48, n=8)[0])
    model[0](with_outliers(gen, cols=(3, 10, 40), value=7.0) * 0.1 + 0)  # scaled: 0.7 < 6, no outlier
    model[0](with_outliers(gen, cols=(3, 10, 40), value=7.0).clamp(-5, 5) + 0)  # none either
    model[0](with_outliers(gen, cols=(3, 10, 40), value=7.0))  # three columns
    st = outlier_stats(model)
    assert (st.calls, st.columns, st.outlier_columns) == (3, 3 * 64, 3)
    assert st.share == pytest.approx(3 / 192) and st.by_module == {"0": pytest.approx(3 / 192), "2": 0.0}
    outlier_stats(model, reset=True)
    assert outlier_stats(model).calls == 0


def test_bytes_are_those_of_w8a8(gen):
    m, plain = make(6.0, gen)
    assert m.quantized_nbytes() == plain.quantized_nbytes() == 48 * 64 + 48 * 4 + 48 * 4


def test_recipe_json_round_trip_and_validation():
    r = RECIPES["llm-int8"]
    assert r.outlier_threshold == 6.0 and Recipe.from_json(r.to_json()) == r
    for t in (0.0, 3.5, math.inf):
        assert Recipe.from_json(r.replace(outlier_threshold=t).to_json()).outlier_threshold == t
    old = json.loads(RECIPES["w8"].to_json())
    del old["outlier_threshold"]  # recipes saved before LLM.int8() existed
    assert Recipe.from_dict(old).outlier_threshold is None
    with pytest.raises(ValueError, match="outlier_threshold=-1"):
        r.replace(outlier_threshold=-1.0)
    with pytest.raises(ValueError, match="dynamic int8 activations"):
        RECIPES["w8"].replace(outlier_threshold=6.0)
    with pytest.raises(ValueError, match="symmetric int8 weights per output channel"):
        LLMInt8Linear(rtn(torch.randn(8, 64), Scheme("int4", PerGroup(32))), act_scheme=A8)


def test_override_to_other_weights_is_refused(smollm2_2layers):
    model, _ = smollm2_2layers
    r = RECIPES["llm-int8"].replace(overrides=(Override("*v_proj", weights=Scheme("int4", PerGroup(64))),))
    with pytest.raises(ValueError, match="LLM.int8"):
        lowbit.quantize(copy.deepcopy(model), r, progress=False)


@pytest.fixture(scope="module")
def ids(smollm2_2layers):
    _, tok = smollm2_2layers
    text = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the "
            "tallest structure in Paris. Its base is square, measuring 125 metres on each side. ") * 4
    return tok(text, return_tensors="pt").input_ids[:, :128]


def _kl(ref, out):
    return F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()


def test_truncated_smollm2(smollm2_2layers, ids):
    model, _ = smollm2_2layers
    with torch.no_grad():
        ref = model(ids).logits
        inf = lowbit.quantize(copy.deepcopy(model), RECIPES["llm-int8"].replace(outlier_threshold=math.inf),
                              progress=False)
        plain = lowbit.quantize(copy.deepcopy(model), "w8a8-dynamic", progress=False)
        assert torch.equal(inf(ids).logits, plain(ids).logits)  # infinite threshold: plain vector-wise int8
        q = lowbit.quantize(copy.deepcopy(model), "llm-int8", progress=False)
        out = q(ids).logits
    assert sum(isinstance(m, LLMInt8Linear) for m in q.modules()) == 14
    st = outlier_stats(q)
    assert 0 < st.share < 0.05 and st.calls == 14
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() > 0.95  # w8a8-dynamic: 0.969, w8: 0.992
    assert _kl(ref, out) < _kl(ref, plain(ids).logits.detach())


def test_save_load_keeps_the_threshold(smollm2_2layers, ids, tmp_path):
    model, tok = smollm2_2layers
    q = lowbit.quantize(copy.deepcopy(model), RECIPES["llm-int8"].replace(outlier_threshold=4.0), progress=False)
    lowbit.save(q, tmp_path / "q", tokenizer=tok, source="smollm2-135m")
    meta = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    assert meta["recipe"]["outlier_threshold"] == 4.0
    back = lowbit.load(tmp_path / "q")
    assert all(m.threshold == 4.0 for m in back.modules() if isinstance(m, LLMInt8Linear))
    assert back.lowbit_recipe == q.lowbit_recipe
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)
    assert model_size(back).bytes == model_size(q).bytes
    assert model_size(q).bytes == model_size(lowbit.quantize(copy.deepcopy(model), "w8a8-dynamic",
                                                             progress=False)).bytes
