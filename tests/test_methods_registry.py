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
