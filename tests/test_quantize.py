"""quantize_tensor: error bounds, range rules, rounding, composite schemes, memory."""
import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit import error_stats, formats, quantize_tensor
from lowbit.core import GroupView, PerGroup, Scheme, make_scheme

REL = 1e-5  # float32 slack on "half a step"


def group_rows(x, **kw):
    """Rows of x as quantize_tensor groups them (the test's own obvious reshape)."""
    return GroupView(tuple(x.shape), make_scheme("int8", **_gran(kw)).granularity).parts(x)


def _gran(kw):
    return {k: kw.get(k) for k in ("granularity", "group_size", "axis", "block")} | {
        k: None for k in ("symmetric", "scale_format", "range", "percentile", "rounding")}


def check_symmetric_bound(x, bits, **kw):
    q = quantize_tensor(x, f"int{bits}", **kw)
    err = (x - q.dequantize())
    for xe, ee in zip(group_rows(x, **kw), group_rows(err, **kw)):
        step = xe.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert bool((ee.abs() <= step / 2 * (1 + REL) + 1e-30).all())
    assert error_stats(x, q).clipped == 0.0


def check_affine_bound(x, bits, **kw):
    q = quantize_tensor(x, f"uint{bits}", symmetric=False, **kw)
    err = (x - q.dequantize())
    for xe, ee in zip(group_rows(x, **kw), group_rows(err, **kw)):
        lo, hi = torch.aminmax(xe, dim=1, keepdim=True)
        step = (hi - lo) / (2**bits - 1)
        slack = step * REL + 1e-6 * torch.maximum(lo.abs(), hi.abs())
        assert bool((ee.abs() <= step / 2 + slack).all())
    assert error_stats(x, q).clipped == 0.0


GRANS = [dict(granularity="tensor"), dict(granularity="channel"), dict(granularity="token"),
         dict(granularity="group", group_size=64), dict(granularity="group", group_size=100),
         dict(granularity="block", block=(16, 32)), dict(granularity="channel", axis=1)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("kw", GRANS, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_error_within_half_step_random(bits, kw, gen):
    x = torch.randn(64, 320, generator=gen) * torch.rand(64, 1, generator=gen) * 3
    check_symmetric_bound(x, bits, **kw)
    check_affine_bound(x, bits, **kw)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_error_within_half_step_on_smollm2(smollm2_weights, bits):
    for w in smollm2_weights.values():
        check_symmetric_bound(w, bits, granularity="group", group_size=64)
        check_affine_bound(w, bits, granularity="group", group_size=128)  # 576 % 128 != 0: ragged
        check_symmetric_bound(w, bits, granularity="channel")


@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), g=st.integers(1, 12),
       bits=st.integers(2, 8), seed=st.integers(0, 2**16), symmetric=st.booleans())
def test_any_shape_and_group_size(shape, g, bits, seed, symmetric):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    kw = dict(granularity="group", group_size=g)
    (check_symmetric_bound if symmetric else check_affine_bound)(x, bits, **kw)
    q = quantize_tensor(x, "int4", **kw)
    assert q.dequantize().shape == x.shape
    assert q.scales.shape == tuple(shape[:-1]) + (math.ceil(shape[-1] / g),)


def test_ragged_group_equals_quantizing_the_pieces(gen):
    x = torch.randn(16, 576, generator=gen)
    whole = quantize_tensor(x, "int4", granularity="group", group_size=128).dequantize()
    body = quantize_tensor(x[:, :512], "int4", granularity="group", group_size=128).dequantize()
    tail = quantize_tensor(x[:, 512:], "int4", granularity="channel").dequantize()
    assert torch.equal(whole, torch.cat([body, tail], dim=1))


def test_fp16_scales_bound_by_the_stored_step(gen):
    x = torch.randn(32, 256, generator=gen)
    q = quantize_tensor(x, "uint4", granularity="group", group_size=64, symmetric=False, scale_format="fp16")
    assert q.scales.dtype == torch.float16 and q.zeros.dtype == torch.float16
    err = (x - q.dequantize()).reshape(32, 4, 64)
    step = q.scales.float().unsqueeze(-1)
    stats = error_stats(x, q)
    # fp16 rounding of s and z (|z| <= 15) moves the grid by at most 15 * 2^-11 steps at each end
    assert bool((err.abs() <= step * (0.5 + 2 * 15 * 2**-11)).all())
    assert stats.clipped == 0.0


def test_mse_range_never_worse_than_absmax(gen, smollm2_weights):
    tensors = [torch.randn(64, 512, generator=gen) ** 3] + list(smollm2_weights.values())[:3]
    for x in tensors:
        for fmt, sym in [("int4", True), ("int3", True), ("uint4", False), ("nf4", True), ("fp4_e2m1", True)]:
            base = dict(granularity="group", group_size=64, symmetric=sym)
            plain = quantize_tensor(x, fmt, **base)
            mse = quantize_tensor(x, fmt, range="mse", **base)
            e0 = (x - plain.dequantize()).pow(2).reshape(-1, 64).sum(1)
            e1 = (x - mse.dequantize()).pow(2).reshape(-1, 64).sum(1)
            assert bool((e1 <= e0 * (1 + 1e-6)).all()), fmt  # per group, hence overall
        assert error_stats(x, quantize_tensor(x, "int4", granularity="group", group_size=64, range="mse")).mse < \
            error_stats(x, quantize_tensor(x, "int4", granularity="group", group_size=64)).mse


def test_percentile_clips_about_the_requested_share(gen):
    x = torch.randn(8, 10_000, generator=gen)
    q = quantize_tensor(x, "int8", granularity="channel", range="percentile", percentile=99.0)
    clipped = error_stats(x, q).clipped
    assert 0.005 < clipped <= 0.0101
    qa = quantize_tensor(x, "uint8", granularity="channel", symmetric=False, range="percentile", percentile=99.0)
    assert 0.01 < error_stats(x, qa).clipped <= 0.0201  # both tails


def test_stochastic_rounding_is_unbiased_and_reproducible():
    x = torch.linspace(-0.93, 0.97, 257).repeat(4000, 1)  # 4000 draws of each value
    for fmt in ["int4", "fp4_e2m1", "nf4"]:
        q = quantize_tensor(x, fmt, granularity="channel", rounding="stochastic",
                            generator=torch.Generator().manual_seed(0))
        mean = q.dequantize().double().mean(0)
        scale = float(q.scale_values()[0])
        step = scale * (1.0 if fmt == "int4" else 2.0 if fmt == "fp4_e2m1" else 0.3)
        # standard error of a mean of 4000 draws is at most step / (2 sqrt(4000))
        assert float((mean - x[0].double()).abs().max()) < 6 * step / (2 * math.sqrt(4000)), fmt
        nearest = quantize_tensor(x[:1], fmt, granularity="channel").dequantize()[0]
        assert float((nearest.double() - x[0].double()).abs().max()) > 20 * float((mean - x[0].double()).abs().mean())
    a = quantize_tensor(x[:10], "int4", rounding="stochastic", generator=torch.Generator().manual_seed(5))
    b = quantize_tensor(x[:10], "int4", rounding="stochastic", generator=torch.Generator().manual_seed(5))
    c = quantize_tensor(x[:10], "int4", rounding="stochastic", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)


def test_double_quantization_saves_bits_and_keeps_accuracy(smollm2_weights):
    w = smollm2_weights["blk.0.ffn_up.weight"]
    plain, dq = quantize_tensor(w, "nf4"), quantize_tensor(w, "nf4-dq")
    assert plain.bits_per_weight == pytest.approx(4.5)
    # QLoRA: 8-bit scales per 64 weights plus an fp32 absmax per 256 scales (and one offset)
    assert dq.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert plain.bits_per_weight - dq.bits_per_weight == pytest.approx(0.373, abs=1e-3)
    assert error_stats(w, dq).sqnr_db > error_stats(w, plain).sqnr_db - 0.1
    assert isinstance(dq.scales, type(dq)) and dq.scales.scheme.format == "dynamic8"


def _ocp_mx_reference(x: np.ndarray, elem, emax: int, elem_max: float) -> np.ndarray:
    """OCP MX v1.0 section 6.3, written from the spec in float64 with ml_dtypes rounding."""
    blocks = x.reshape(-1, 32).astype(np.float64)
    amax = np.abs(blocks).max(1, keepdims=True)
    shared = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - emax, 0)
    scale = 2.0 ** np.clip(shared, -127, 127)
    scaled = np.clip(blocks / scale, -elem_max, elem_max)
    return (scaled.astype(np.float32).astype(elem).astype(np.float64) * scale).reshape(x.shape)


@pytest.mark.parametrize("name,elem,emax,elem_max", [
    ("mxfp4", ml_dtypes.float4_e2m1fn, 2, 6.0), ("mxfp6", ml_dtypes.float6_e2m3fn, 2, 7.5),
    ("mxfp6_e3m2", ml_dtypes.float6_e3m2fn, 4, 28.0), ("mxfp8", ml_dtypes.float8_e4m3fn, 8, 448.0)])
def test_mx_schemes_match_the_ocp_spec(name, elem, emax, elem_max, smollm2_weights, gen):
    for x in [torch.randn(64, 256, generator=gen) * 10, smollm2_weights["blk.0.attn_q.weight"]]:
        q = quantize_tensor(x, name)
        ref = _ocp_mx_reference(x.numpy(), elem, emax, elem_max)
        assert np.array_equal(q.dequantize().double().numpy(), ref)
        assert q.scales.dtype == torch.uint8  # E8M0 codes
        assert q.bits_per_weight == pytest.approx(formats.get(q.scheme.format).bits + 8 / 32)


def test_nvfp4_matches_its_two_level_definition(gen):
    x = torch.randn(32, 128, generator=gen) * 3
    q = quantize_tensor(x, "nvfp4")
    ts = x.abs().max() / (6.0 * 448.0)
    assert torch.equal(q.tensor_scale, ts)
    blocks = x.reshape(-1, 16)
    sb = (blocks.abs().amax(1, keepdim=True) / 6.0 / ts).to(torch.float8_e4m3fn).float()
    eff = sb * ts
    y = np.clip((blocks / eff).numpy(), -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    ref = torch.from_numpy(y) * eff
    assert torch.equal(q.dequantize(), ref.reshape(x.shape))
    assert q.bits_per_weight == pytest.approx(4 + 8 / 16 + 32 / x.numel())


@pytest.mark.parametrize("bits", range(1, 9))
def test_nbytes_match_the_textbook(bits):
    n = 1000 + bits
    x = torch.randn(n)
    if bits >= 2:
        q = quantize_tensor(x, f"int{bits}", scale_format="fp16")
        assert q.nbytes == math.ceil(n * bits / 8) + 2
    qa = quantize_tensor(x, f"uint{bits}", symmetric=False, scale_format="fp16")
    assert qa.nbytes == math.ceil(n * bits / 8) + 4
    assert qa.codes.numel() == math.ceil(n * bits / 8)


def test_codes_are_densely_packed_for_odd_widths(gen):
    x = torch.randn(3, 333, generator=gen)
    for bits in (3, 5, 6, 7):
        q = quantize_tensor(x, f"int{bits}", granularity="channel")
        assert q.codes.numel() == math.ceil(x.numel() * bits / 8)
        assert int(q.unpack_codes().max()) < 2**bits


def test_learned_codebook_per_group(gen):
    x = torch.randn(16, 256, generator=gen)
    q = quantize_tensor(x, "kmeans3", granularity="group", group_size=128, scale_format="fp16", seed=1)
    assert q.codebook.shape == (16, 2, 8) and q.codebook.dtype == torch.float16
    assert q.nbytes == math.ceil(x.numel() * 3 / 8) + 16 * 2 * 8 * 2
    uni = quantize_tensor(x, "int3", granularity="group", group_size=128)
    assert error_stats(x, q).mse < error_stats(x, uni).mse
    again = quantize_tensor(x, "kmeans3", granularity="group", group_size=128, scale_format="fp16", seed=1)
    assert torch.equal(q.codes, again.codes)


def test_edge_cases_give_correct_results():
    empty = quantize_tensor(torch.zeros(0, 64), "int4", granularity="group", group_size=32)
    assert empty.dequantize().shape == (0, 64) and empty.codes.numel() == 0
    zeros = quantize_tensor(torch.zeros(4, 64), "nvfp4")
    assert torch.equal(zeros.dequantize(), torch.zeros(4, 64))
    for fmt, sym in [("int4", True), ("uint4", False), ("nf4", True), ("fp8_e4m3", True)]:
        const = torch.full((4, 64), -2.5)
        assert torch.equal(quantize_tensor(const, fmt, symmetric=sym).dequantize(), const), fmt
    # MX power-of-two scales cannot hit every constant: the OCP rule gives 2.5 -> 2 (5 -> 4 in fp4)
    assert torch.equal(quantize_tensor(torch.full((1, 32), -2.5), "mxfp4").dequantize(), torch.full((1, 32), -2.0))
    scalar = quantize_tensor(torch.tensor(3.0), "int8")
    assert float(scalar.dequantize()) == 3.0
    tiny = torch.full((8,), 1e-30)
    assert torch.allclose(quantize_tensor(tiny, "int8").dequantize(), tiny)


@pytest.mark.parametrize("call,match", [
    (lambda: quantize_tensor(torch.tensor([1.0, float("nan")]), "int4"), "NaN"),
    (lambda: quantize_tensor(torch.tensor([1.0, float("inf")]), "int4"), "Inf"),
    (lambda: quantize_tensor(torch.ones(4), "int9"), "unknown format 'int9'"),
    (lambda: quantize_tensor(torch.ones(4), "int4", granularity="groups"), "granularity='groups'"),
    (lambda: quantize_tensor(torch.ones(4), "int4", granularity="group"), "group_size"),
    (lambda: quantize_tensor(torch.ones(4, 4), "int4", granularity="channel", axis=2), "axis 2"),
    (lambda: quantize_tensor(torch.ones(6, 6), "int4", granularity="block", block=(4, 4)), "does not divide"),
    (lambda: quantize_tensor(torch.ones(4), "fp8_e4m3", symmetric=False), "affine"),
    (lambda: quantize_tensor(torch.ones(4), "uint4"), "unsigned"),
    (lambda: quantize_tensor(torch.ones(4), "int4", range="minmax"), "minmax"),
    (lambda: quantize_tensor(torch.ones(4), "int4", scale_format="fp64"), "scale_format"),
    (lambda: quantize_tensor(torch.ones(4), "int4", rounding="up"), "rounding"),
    (lambda: quantize_tensor(torch.ones(4, dtype=torch.int32), "int4"), "floating-point"),
    (lambda: quantize_tensor(torch.ones(4) * 1e6, "int4", scale_format="fp16"), "exceeds"),
    (lambda: quantize_tensor(torch.ones(4), "uint4", symmetric=False, scale_format="e8m0"), "zero points"),
    # wider than a byte: refused by the Scheme, before any packing
    (lambda: quantize_tensor(torch.ones(4), "fp16"), "'fp16' has 16-bit codes.*model.half"),
    (lambda: quantize_tensor(torch.ones(4), "bf16"), "'bf16' has 16-bit codes.*model.bfloat16"),
    (lambda: quantize_tensor(torch.ones(4), "q4.4"), "'q4.4' has 9-bit codes"),
    (lambda: quantize_tensor(torch.ones(4), "q7.8"), "'q7.8' has 16-bit codes"),
    (lambda: Scheme("int4", double_quant=Scheme("int8").replace(format="fp16")), "'fp16' has 16-bit"),
])
def test_bad_input_gets_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_scheme_json_round_trip():
    for s in [make_scheme("nf4-dq", granularity=None, group_size=None, axis=None, block=None),
              Scheme("uint4", PerGroup(128), symmetric=False, range="mse", scale_format="fp16"),
              make_scheme("nvfp4", granularity=None, group_size=None, axis=None, block=None)]:
        d = json.loads(json.dumps(s.to_dict()))
        assert Scheme.from_dict(d) == s
    bad = Scheme("int4").to_dict() | {"version": 99}
    with pytest.raises(ValueError, match="version 99"):
        Scheme.from_dict(bad)


def test_error_stats_formulas(gen):
    x = torch.randn(1000, generator=gen)
    q = quantize_tensor(x, "int4")
    e = error_stats(x, q)
    d = (x - q.dequantize()).double()
    assert e.mse == pytest.approx(float(d.pow(2).mean()))
    assert e.max_abs == pytest.approx(float(d.abs().max()))
    assert e.sqnr_db == pytest.approx(10 * math.log10(float(x.double().pow(2).sum() / d.pow(2).sum())))
    assert error_stats(x, x).sqnr_db == math.inf and error_stats(x, x).clipped is None


def test_nvfp4_block_scale_at_the_fp8_max_does_not_overflow():
    # float32 rounding can put block amax / tensor scale an ulp above 448 (seen with seed 42)
    for seed in range(200):
        torch.manual_seed(seed)
        x = torch.randn(16, 64)
        q = quantize_tensor(x, "nvfp4")
        assert torch.isfinite(q.dequantize()).all()


def test_integer_zero_point_makes_zero_exact_and_keeps_the_bound(gen):
    x = torch.randn(32, 256, generator=gen) + 0.3
    x[:, ::7] = 0.0
    q = quantize_tensor(x, Scheme("uint4", PerGroup(64), symmetric=False, range="minmax", integer_zero=True))
    z = q.zero_values()
    assert torch.equal(z, torch.round(z))
    xhat = q.dequantize()
    assert torch.equal(xhat[:, ::7], torch.zeros_like(xhat[:, ::7]))
    for xe, ee in zip(group_rows(x, granularity="group", group_size=64),
                      group_rows(x - xhat, granularity="group", group_size=64)):
        lo, hi = xe.min(1, keepdim=True).values.clamp(max=0), xe.max(1, keepdim=True).values.clamp(min=0)
        assert bool((ee.abs() <= (hi - lo) / 15 / 2 * (1 + REL)).all())
    with pytest.raises(ValueError, match="integer_zero"):
        Scheme("int4", integer_zero=True)
