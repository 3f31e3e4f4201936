"""The method registry (methods/__init__.py) and the round-to-nearest solvers (methods/rtn.py)."""
import pytest
import torch

from lowbit.core import quantize
from lowbit.methods import (METHODS, TRANSFORMS, check_method_options, get_method, method_needs, mse_clip,
                            parse_method, rtn)
from lowbit.pipeline import RECIPES


def test_parse_method_splits_transforms_and_solver():
    assert parse_method("awq+gptq") == (("awq",), "gptq")
    assert parse_method(" awq + smoothquant + hqq ") == (("awq", "smoothquant"), "hqq")
    assert parse_method("smoothquant") == (("smoothquant",), "rtn")
    assert parse_method("mse") == ((), "mse")
    for bad, said in [("gptq+awq", "transforms first"), ("awq+awq", "each once"), ("rtn+gptq", "at most one"),
                      ("awq+nope", "unknown method 'nope'"), ("", "unknown method ''")]:
        with pytest.raises(ValueError, match=said):
            parse_method(bad)


def test_get_method_and_needs():
    assert get_method("awq+gptq") is METHODS["gptq"]
    assert get_method("awq") is METHODS["rtn"]
    assert method_needs("rtn") == set() and method_needs("hqq") == set()
    assert method_needs("gptq") == {"hessian"}
    assert method_needs("awq") == {"hessian", "absmean"}
    assert method_needs("smoothquant+gptq") == {"absmax", "hessian"}
    with pytest.raises(ValueError, match="unknown"):
        method_needs("nope")
    assert set(TRANSFORMS) == {"awq", "smoothquant"}


def test_check_method_options():
    opts = {"gptq": {"damp": 0.05, "act_order": False}, "smoothquant": {"alpha": 0.8}}
    out = check_method_options(opts)
    assert out == opts and out is not opts and out["gptq"] is not opts["gptq"]
    assert check_method_options({}) == {}
    for bad, said in [([], "must be a dict of {method"), ({"nope": {}}, "unknown method 'nope'; known: rtn, mse"),
                      ({"gptq": 1}, r"method_options\['gptq'\] must be a dict"),
                      ({"gptq": {"stats": 1}}, "has no option 'stats'"),
                      ({"gptq": {"dampp": 1}}, "its options: act_order, block_size, clip, damp"),
                      ({"rtn": {"x": 1}}, "its options: none"),
                      ({"gptq": {"damp": float("nan")}}, "gptq.damp=nan is not a JSON value"),
                      ({"gptq": {"damp": object()}}, "is not a JSON value")]:
        with pytest.raises(ValueError, match=said):
            check_method_options(bad)


@pytest.mark.parametrize("name", ["w4g64", "w4g64-sym", "nf4"])
def test_rtn_is_quantize_and_mse_clip_searches_the_range(name, gen):
    scheme = RECIPES[name].weights
    w = torch.randn(16, 128, generator=gen)
    w[:, 7] *= 6  # outliers: clipping pays
    assert torch.equal(rtn(w, scheme).codes, quantize(w, scheme).codes)
    m = mse_clip(w, scheme)
    assert m.scheme.range == "mse" and m.scheme.name is None and m.scheme.format == scheme.format
    assert torch.equal(m.dequantize(), quantize(w, scheme.replace(range="mse", name=None)).dequantize())
    err = lambda q: float(((w - q.dequantize()) ** 2).sum())  # noqa: E731
    assert err(m) < err(rtn(w, scheme))


def test_smoothquant_scales_at_the_edges(gen):
    from lowbit.methods import smoothquant_scales
    from lowbit.pipeline.stats import InputStats

    st = InputStats(6, hessian=False)
    x = torch.tensor([[0.0, 1e-7, 2.0, 3.0, 1e6, 4.0]])
    st.update(x, 0)
    w = torch.tensor([[1.0, 1.0, 0.0, 1e-7, 1e-6, 2.0]])
    s = smoothquant_scales([w], st, alpha=0.5)
    # channel 0 never fires and channel 2 has no weight: scale 1; tiny values are floored at 1e-5
    want = [1.0, (1e-5 ** 0.5) / 1.0, 1.0, 3.0 ** 0.5 / 1e-5 ** 0.5, 1e5, 4.0 ** 0.5 / 2.0 ** 0.5]
    torch.testing.assert_close(s.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0)
    assert float(s[4]) == 1e5  # 1e6^0.5 / 1e-5^0.5 = 3.2e5, capped
    st2 = InputStats(2, hessian=False)
    st2.update(torch.tensor([[1e-6, 5.0]]), 0)
    s2 = smoothquant_scales([torch.tensor([[1e4, 1.0]])], st2, alpha=0.0)
    assert float(s2[0]) == pytest.approx(1e-4) and float(s2[1]) == 1.0  # alpha 0: 1 / max|W|
    tiny = smoothquant_scales([torch.tensor([[1e6, 1.0]])], st2, alpha=0.0)
    assert float(tiny[0]) == pytest.approx(1e-5, rel=1e-6)  # floored at 1e-5
    for alpha in (0.0, 1.0):
        smoothquant_scales([w], st, alpha=alpha)
    for alpha in (-0.01, 1.01):
        with pytest.raises(ValueError, match=rf"^smoothquant alpha={alpha} must lie in \[0, 1\]$"):
            smoothquant_scales([w], st, alpha=alpha)


def test_llm_int8_threshold_and_decomposition():
    import math

    from lowbit.methods.llm_int8 import check_threshold, decompose, outlier_columns

    assert check_threshold(6) == 6.0 and isinstance(check_threshold(6), float)
    assert check_threshold(0) == 0.0 and check_threshold(math.inf) == math.inf
    for bad in (True, -1, float("nan"), "6", None):
        with pytest.raises(ValueError, match=r"^outlier_threshold=.*: give a number >= 0 \(6.0 in LLM.int8\(\); "
                                             r"0 runs every column in full precision, inf none\)$"):
            check_threshold(bad)
    x = torch.tensor([[0.5, -7.0, 1.0, 6.0], [0.0, 1.0, -2.0, 0.0]])
    cols = outlier_columns(x, 6.0)
    assert cols.tolist() == [1, 3] and cols.dtype == torch.int64
    assert outlier_columns(x, math.inf).tolist() == [] and outlier_columns(x, 0.0).tolist() == [0, 1, 2, 3]
    regular, outl = decompose(x, cols)
    assert torch.equal(regular, torch.tensor([[0.5, 0.0, 1.0, 0.0], [0.0, 0.0, -2.0, 0.0]]))
    assert torch.equal(outl, x[:, [1, 3]]) and x[0, 1] == -7.0  # the input is left alone
