"""GPTQ code for code against the paper's algorithm (tests/reference/gptq_ref.py), through both
column loops (numba and torch), with the round-to-nearest fallback off: a fallback would hide a
broken solver behind RTN's answer."""
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import kernels
from lowbit.core import PerChannel, PerGroup, PerTensor, Scheme, quantize
from lowbit.methods import gptq
from lowbit.pipeline.sequential import layer_loss
from lowbit.pipeline.stats import InputStats
from reference.gptq_ref import gptq_reference

SCHEMES = {
    "uint4-affine": lambda g: Scheme("uint4", g, symmetric=False, range="minmax", scale_format="fp16"),
    "int3-sym": lambda g: Scheme("int3", g, symmetric=True, range="absmax", scale_format="fp16"),
}
# name: (grouped, act_order, static_groups)
VARIANTS = {
    "plain": (False, False, False),
    "grouped": (True, False, False),
    "act_order": (False, True, False),
    "act_order+static_groups": (True, True, True),
    "static_groups": (True, False, True),
}


def outlier_inputs(n: int, dim: int, g: torch.Generator, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """Correlated channels of very different sizes (so act_order reorders), some always zero."""
    mix = torch.randn(dim, dim, generator=g) * 0.3 + torch.eye(dim)
    x = (torch.randn(n, dim, generator=g) @ mix) * (torch.rand(dim, generator=g) * 3) ** 2
    x[:, list(dead)] = 0
    return x


def hessian_of(x: torch.Tensor) -> InputStats:
    s = InputStats(x.shape[1], hessian=True)
    s.update(x, 0)
    return s


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the blocks the numba column loop solved."""
    calls = []
    real = kernels.gptq_int_block

    def counting(*a):
        out = real(*a)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(kernels, "gptq_int_block", counting)
    return calls


def check_equal(w, x, scheme, *, kernel, calls, block_size, act_order, static_groups, static):
    st_ = hessian_of(x)
    q = gptq(w, scheme, stats=st_, act_order=act_order, static_groups=static_groups, block_size=block_size,
             fallback_to_rtn=False, kernel=kernel)
    Q, S, Z = gptq_reference(w, st_.hessian, scheme, act_order=act_order, static_groups=static_groups,
                             block_size=block_size)
    levels = scheme.fmt.decode(q.unpack_codes()).reshape(w.shape)
    assert int((levels != Q).sum()) == 0, f"{int((levels != Q).sum())} of {Q.numel()} codes differ"
    gs = scheme.granularity.size if isinstance(scheme.granularity, PerGroup) else w.shape[1]
    k = torch.arange(w.shape[1]) // gs
    assert torch.equal(q.dequantize(), (Q - Z[:, k]) * S[:, k])
    blocks = -(-w.shape[1] // block_size)
    assert calls == ([True] * blocks if kernel and static else []), "the numba loop ran where it should (only)"


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "torch"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", SCHEMES)
def test_gptq_codes_equal_the_papers_algorithm(fmt, variant, kernel, kernel_calls, gen):
    grouped, act_order, static_groups = VARIANTS[variant]
    scheme = SCHEMES[fmt](PerGroup(32) if grouped else PerChannel(0))
    x = outlier_inputs(256, 96, gen, dead=(5, 40))
    w = torch.randn(12, 96, generator=gen) * 0.05
    check_equal(w, x, scheme, kernel=kernel, calls=kernel_calls, block_size=32, act_order=act_order,
                static_groups=static_groups, static=act_order or static_groups or not grouped)


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "torch"])
def test_gptq_defaults_equal_the_papers_algorithm(kernel, kernel_calls, gen):
    # the defaults: act_order, block size 128, two blocks, ragged last group
    scheme = SCHEMES["uint4-affine"](PerGroup(64))
    x = outlier_inputs(512, 200, gen, dead=(3,))
    w = torch.randn(8, 200, generator=gen) * 0.05
    check_equal(w, x, scheme, kernel=kernel, calls=kernel_calls, block_size=128, act_order=True,
                static_groups=False, static=True)
    q = gptq(w, scheme, stats=hessian_of(x), kernel=kernel, fallback_to_rtn=False)
    assert torch.equal(q.codes, gptq(w, scheme, stats=hessian_of(x), act_order=True, block_size=128,
                                     fallback_to_rtn=False, kernel=kernel).codes)


@settings(max_examples=15, deadline=None)
@given(cols=st.integers(3, 150), group=st.sampled_from([16, 32, 64]), bits=st.integers(2, 8),
       symmetric=st.booleans(), act_order=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_ragged_groups_any_width_equal_the_reference(cols, group, bits, symmetric, act_order, seed):
    g = torch.Generator().manual_seed(seed)
    scheme = Scheme(f"int{bits}" if symmetric else f"uint{bits}", PerGroup(group), symmetric=symmetric,
                    range="absmax" if symmetric else "minmax", scale_format="fp16")
    w = torch.randn(6, cols, generator=g)
    x = outlier_inputs(128, cols, g)
    H = hessian_of(x).hessian
    q = gptq(w, scheme, stats=hessian_of(x), act_order=act_order, fallback_to_rtn=False)
    Q, _, _ = gptq_reference(w, H, scheme, act_order=act_order)
    assert torch.equal(scheme.fmt.decode(q.unpack_codes()).reshape(w.shape), Q)
    r = quantize(w, scheme)
    assert q.nbytes == r.nbytes  # exact storage: a ragged last group costs one scale (and zero)
    # the fallback returns whichever of GPTQ and round to nearest has the smaller layer loss
    f = gptq(w, scheme, stats=hessian_of(x), act_order=act_order)
    best = min(layer_loss(w, q.dequantize(), H), layer_loss(w, r.dequantize(), H))
    assert layer_loss(w, f.dequantize(), H) == best


def test_zero_damp_escalates_on_a_singular_hessian(gen):
    # 16 tokens for 64 inputs: H has rank 16, Cholesky fails without dampening; the retry
    # used to multiply a zero damp by ten (still zero) and give up
    x = torch.randn(16, 64, generator=gen)
    w = torch.randn(8, 64, generator=gen)
    scheme = SCHEMES["uint4-affine"](PerGroup(32))
    q = gptq(w, scheme, stats=hessian_of(x), damp=0.0, fallback_to_rtn=False)
    assert torch.isfinite(q.dequantize()).all()
    with pytest.raises(ValueError, match="damp"):
        gptq(w, scheme, stats=hessian_of(x), damp=-0.1)


def test_one_input_shared_by_several_calls_keeps_each_factor_apart(gen):
    # q/k/v share one InputStats and its cache of Hessian factors: each (damp, act_order) has its own
    scheme = SCHEMES["uint4-affine"](PerGroup(32))
    x = outlier_inputs(256, 64, gen)
    shared = hessian_of(x)
    w = torch.randn(8, 64, generator=gen) * 0.05
    for damp, act_order in [(0.01, True), (0.01, False), (0.5, True), (0.01, True)]:
        q = gptq(w, scheme, stats=shared, damp=damp, act_order=act_order, block_size=32, fallback_to_rtn=False)
        Q, _, _ = gptq_reference(w, shared.hessian, scheme, damp=damp, act_order=act_order, block_size=32)
        assert torch.equal(scheme.fmt.decode(q.unpack_codes()).reshape(w.shape), Q), (damp, act_order)
    assert len(shared.cache) == 3


@pytest.mark.parametrize("kernel", [True, False], ids=["numba", "torch"])
def test_per_tensor_and_clipped_ranges_equal_the_reference(kernel, gen):
    from lowbit.methods.awq import awq_clip

    x = outlier_inputs(256, 64, gen, dead=(9,))
    st_ = hessian_of(x)
    w = torch.randn(8, 64, generator=gen) * 0.05
    for tensor in (Scheme("int8", PerTensor(), symmetric=True, range="absmax"),
                   Scheme("uint4", PerTensor(), symmetric=False, range="minmax"),
                   Scheme("uint4", PerChannel(-2), symmetric=False, range="minmax")):
        q = gptq(w, tensor, stats=st_, block_size=32, fallback_to_rtn=False, kernel=kernel)
        Q, S, Z = gptq_reference(w, st_.hessian, tensor, block_size=32, act_order=True)
        assert torch.equal(tensor.fmt.decode(q.unpack_codes()).reshape(w.shape), Q)
        assert torch.equal(q.dequantize(), (Q - Z[:, :1]) * S[:, :1])
    # clip=True: static ranges fitted on AWQ's clipped weights, the solve on the unclipped ones
    scheme = SCHEMES["uint4-affine"](PerGroup(32))
    w0 = w.clone()
    w0[:, 9] = 0  # the dead input, zeroed before the fit
    clipped = awq_clip(w0, scheme, st_)
    assert not torch.equal(clipped, w0)
    q = gptq(w, scheme, stats=st_, clip=True, block_size=32, fallback_to_rtn=False, kernel=kernel)
    Q, S, Z = gptq_reference(w, st_.hessian, scheme, act_order=True, block_size=32, fit_on=clipped)
    assert torch.equal(scheme.fmt.decode(q.unpack_codes()).reshape(w.shape), Q)
    plain = gptq(w, scheme, stats=st_, block_size=32, fallback_to_rtn=False, kernel=kernel)
    assert not torch.equal(plain.codes, q.codes)


@pytest.mark.parametrize("name", ["nvfp4", "nf4-dq"])
def test_tensor_scales_and_double_quantized_scales_are_fitted_up_front(name, gen):
    # such scale layouts cannot be refitted group by group: GPTQ keeps round to nearest's scales
    from lowbit.pipeline import RECIPES

    scheme = RECIPES[name].weights
    x = outlier_inputs(256, 128, gen)
    w = torch.randn(8, 128, generator=gen) * 0.05
    q = gptq(w, scheme, stats=hessian_of(x), act_order=False, fallback_to_rtn=False)
    r = quantize(w, scheme)
    assert torch.equal(q.scale_values(), r.scale_values())
    assert not torch.equal(q.codes, r.codes)


def test_bad_calls_say_what_to_do(gen):
    scheme = SCHEMES["uint4-affine"](PerGroup(32))
    w = torch.randn(4, 64, generator=gen)
    st_ = hessian_of(torch.randn(32, 64, generator=gen))
    with pytest.raises(ValueError, match=r"^gptq needs calibration statistics with a Hessian \(run it through "
                                         r"lowbit.quantize with calibration batches\)$"):
        gptq(w, scheme, stats=object())
    with pytest.raises(ValueError, match=r"^Hessian of shape \(64, 64\) does not match a weight with 32 input "
                                         r"columns$"):
        gptq(w[:, :32], scheme, stats=st_)
    with pytest.raises(ValueError, match=r"^gptq quantizes weights \[out, in\] per tensor, per output channel or "
                                         r"in groups along the input axis; granularity PerGroup\(size=16, axis=0\) "
                                         r"is not supported$"):
        gptq(w, Scheme("int4", PerGroup(16, axis=0)), stats=st_)
    with pytest.raises(ValueError, match=r"^gptq damp=-0.1: give a number >= 0 \(the share of mean\(diag H\) "
                                         r"added to the diagonal; 0.01 in the paper\)$"):
        gptq(w, scheme, stats=st_, damp=-0.1)
    nan = SimpleNamespace(hessian=hessian_of(torch.randn(32, 64, generator=gen)).hessian)
    nan.hessian[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^the Hessian has NaN or Inf entries"):
        gptq(w, scheme, stats=nan)
    bad = SimpleNamespace(hessian=hessian_of(torch.randn(32, 64, generator=gen)).hessian)
    bad.hessian[0, 1] = bad.hessian[1, 0] = 1e7  # indefinite beyond any dampening tried
    with pytest.raises(ValueError, match=r"^the Hessian is not positive definite even with strong dampening; "
                                         r"check the calibration data \(NaN or too few tokens\?\)$"):
        gptq(w, scheme, stats=bad)


def test_dampening_escalates_tenfold_from_the_given_damp(gen):
    # H with a slightly negative eigenvalue (-5e-4 of mean(diag H)): damp 1e-4 fails, so the retry
    # uses 10 x 1e-4 = 1e-3, the answer the paper's algorithm gives with damp=1e-3
    x = torch.randn(16, 48, generator=gen)
    H = 2 * x.T @ x / 16
    H -= 5e-4 * float(H.diagonal().mean()) / (1 - 5e-4) * torch.eye(48)
    w = torch.randn(8, 48, generator=gen)
    scheme = SCHEMES["uint4-affine"](PerGroup(16))
    q = gptq(w, scheme, stats=SimpleNamespace(hessian=H), damp=1e-4, act_order=False, fallback_to_rtn=False)
    Q, _, _ = gptq_reference(w, H, scheme, damp=1e-3, act_order=False)
    assert torch.equal(scheme.fmt.decode(q.unpack_codes()).reshape(w.shape), Q)
