"""The packed-code matmul kernels (kernels/qmatmul.py) against float64 dequantize-then-matmul.

Tolerance, stated once: a float32 dot product of K terms is off from the exact one by at
most about sqrt(K) * 2^-24 * sum_k |x_k w_k| on random data (K * 2^-24 in the worst case);
we allow 4 * sqrt(K) * 2^-24 * (|x| @ |W|^T) per output, and check that the torch path the
kernels replace (dequantize to float32, F.linear) meets the same bound, so the bound is
neither loose nor stricter than the reference itself. bf16 outputs add their own rounding
(2^-8 of |y|).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.core import QTensor, Scheme
from lowbit.core.granularity import PerChannel, PerGroup
from lowbit.kernels import qmatmul
from lowbit.nn import QuantLinear
from lowbit.nn.kernel_plan import plan
from lowbit.pipeline import RECIPES
from lowbit.pipeline.recipe import solver_scheme

SCHEMES = {
    "w4g32": RECIPES["w4g32"].weights,  # uint4 affine, fp16 scales and zeros
    "w4g64": RECIPES["w4g64"].weights,
    "w4g128": RECIPES["w4g128"].weights,
    "int4-g64-fp32": Scheme("int4", PerGroup(64)),
    "int4-g128-bf16": Scheme("int4", PerGroup(128), scale_format="bf16"),
    "int4-g64-fp16-affine-intzero": Scheme("int4", PerGroup(64), symmetric=False, range="minmax",
                                           scale_format="fp16", integer_zero=True),
    "nf4": RECIPES["nf4"].weights,
    "nf4-dq": RECIPES["nf4-dq"].weights,
    "mxfp4": lowbit.core.SCHEMES["mxfp4"],  # e8m0 scales: widened to float32 once
    "w8": RECIPES["w8"].weights,
    "uint8-channel-affine": Scheme("uint8", PerChannel(0), symmetric=False, range="minmax"),
    "int8-g128": Scheme("int8", PerGroup(128), scale_format="fp16"),
    "fp8": RECIPES["fp8"].weights,
    "fp8-tensor": RECIPES["fp8-tensor"].weights,
    "fp8_e5m2-channel": Scheme("fp8_e5m2", PerChannel(0)),
    "nvfp4": lowbit.core.SCHEMES["nvfp4"],  # groups of 16, fp8 scales and a tensor scale
    "uint4-g16-affine": Scheme("uint4", PerGroup(16), symmetric=False, range="minmax", scale_format="fp16"),
    "w4g64-hqq": solver_scheme(RECIPES["w4g64"].weights, "hqq"),  # output-axis groups, float zeros
    "int8-g32-output-axis": Scheme("int8", PerGroup(32, axis=0), scale_format="bf16"),
    "fp8-g64-output-axis": Scheme("fp8_e4m3", PerGroup(64, axis=0)),
    "mxfp8": lowbit.core.SCHEMES["mxfp8"],  # fp8 e4m3 in groups of 32, e8m0 scales
}
# [N, K]: SmolLM2's input widths, ragged last groups (200 = 3*64 + 8, 1000 = 7*128 + 104), N not
# a multiple of the kernel's 4 rows; the full SmolLM2 shapes are in the real-weights test
SHAPES = [(96, 576), (66, 1536), (37, 200), (64, 1000)]


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """4 sqrt(K) 2^-24 (|x| @ |W|^T), in float64."""
    return 4 * math.sqrt(w.shape[1]) * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T)


def check(y: torch.Tensor, x: torch.Tensor, q: QTensor, bias=None):
    w = q.dequantize()
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    tol = bound(x, w) + (2.0 ** -8 * ref.abs() if y.dtype == torch.bfloat16 else 0)
    err = (y.double() - ref).abs()
    assert (err <= tol + 1e-30).all(), f"max error {err.max():.3g}, allowed {tol.flatten()[err.argmax()]:.3g}"
    torch_path = F.linear(x.float(), w, None if bias is None else bias.float()).double()
    assert ((torch_path - ref).abs() <= bound(x, w) + 1e-30).all(), "the bound is stricter than the torch path"


def test_the_kernels_build_and_run_here():
    assert qmatmul.ops() is not None, qmatmul.backend()  # CI runs on the same kind of AVX-512 CPU


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", SCHEMES)
def test_gemv_matches_float64_on_random_weights(name, shape, gen):
    N, K = shape
    scheme = SCHEMES[name]
    w = torch.randn(N, K, generator=gen) * torch.rand(N, 1, generator=gen)  # rows of different scale
    q = lowbit.core.quantize(w, scheme)
    p = plan(q)
    assert p is not None and p.covered, f"{name} {shape} should have a kernel"
    for M in (1, 2, 5, 16):
        x = torch.randn(M, K, generator=gen)
        check(qmatmul.linear(x, p), x, q)


@pytest.mark.parametrize("name", ["w4g64", "nf4", "nf4-dq", "w8", "fp8", "nvfp4", "w4g64-hqq"])
def test_kernels_match_float64_on_smollm2_weights(name, smollm2_weights, gen):
    for w in smollm2_weights.values():
        q = lowbit.core.quantize(w, SCHEMES[name])
        p = plan(q)
        x = torch.randn(3, w.shape[1], generator=gen)
        for rows in (x[:1], x):
            check(qmatmul.linear(rows, p), rows, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_and_bias(dtype, gen):
    w, bias = torch.randn(96, 320, generator=gen), torch.randn(96, generator=gen)
    q = lowbit.core.quantize(w, SCHEMES["w4g64"])
    x = torch.randn(4, 2, 320, generator=gen).to(dtype)  # batch dims are kept
    y = qmatmul.linear(x, plan(q), bias)
    assert y.dtype == dtype and y.shape == (4, 2, 96)
    ref = F.linear(x.double(), q.dequantize().double(), bias.double())
    assert torch.allclose(y.double(), ref, rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("name", ["w4g64", "int4-g64-fp32", "nf4-dq", "w8", "uint8-channel-affine", "fp8",
                                  "fp8_e5m2-channel", "mxfp4", "nvfp4", "uint4-g16-affine", "w4g64-hqq",
                                  "int8-g32-output-axis", "fp8-g64-output-axis"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_kernel_is_bit_exact(name, dtype, gen):
    w = torch.randn(70, 1000, generator=gen)
    q = lowbit.core.quantize(w, SCHEMES[name])
    assert torch.equal(qmatmul.dequantize(plan(q), dtype), q.dequantize(dtype))


def test_prefill_route_matches(gen):
    w = torch.randn(256, 576, generator=gen)
    q = lowbit.core.quantize(w, SCHEMES["w4g64"])
    x = torch.randn(100, 576, generator=gen)
    check(qmatmul.linear(x, plan(q)), x, q)
    xb = x.bfloat16()  # bf16 prefill without int8: the bf16 matmul of the exactly dequantized bf16 weight
    with qmatmul.activations("float"):
        assert torch.equal(qmatmul.linear(xb, plan(q)), F.linear(xb, q.dequantize(torch.bfloat16)))


def test_schemes_without_a_kernel_get_none(gen):
    w = torch.randn(32, 96, generator=gen)
    for scheme in [Scheme("int3", PerGroup(32)), Scheme("int4", PerGroup(48)), Scheme("int8", PerGroup(16)),
                   Scheme("int4", PerGroup(6, axis=0)), Scheme("nf4", PerChannel(1)),
                   Scheme("kmeans4", PerChannel(0))]:
        p = plan(lowbit.core.quantize(w, scheme))
        assert p is not None and not p.covered
        assert qmatmul.linear(torch.randn(1, 96), p) is None


def test_gradients_and_autocast_take_the_torch_path(gen):
    q = lowbit.core.quantize(torch.randn(64, 128, generator=gen), SCHEMES["w4g64"])
    p = plan(q)
    x = torch.randn(2, 128, generator=gen, requires_grad=True)
    assert qmatmul.linear(x, p) is None
    with torch.no_grad():
        assert qmatmul.linear(x, p) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert qmatmul.linear(x.detach(), p) is None


def test_a_failed_build_falls_back(monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(*a, **k):
        raise RuntimeError("Error building extension")

    monkeypatch.setattr(ext, "load", broken)
    assert qmatmul.ops.__wrapped__() is None
    assert "build failed" in qmatmul._build_error
    monkeypatch.setenv("LOWBIT_KERNELS", "0")
    assert qmatmul.ops.__wrapped__() is None


def _forbid_dequantize(monkeypatch):
    def no(*a, **k):
        raise AssertionError("the torch path ran: QTensor.dequantize was called")
    monkeypatch.setattr(QTensor, "dequantize", no)


def test_quantlinear_uses_the_kernel_and_keeps_its_plan(monkeypatch, gen):
    lin = torch.nn.Linear(576, 192)
    q = lowbit.core.quantize(lin.weight.detach(), SCHEMES["nf4"])
    layer = QuantLinear.from_linear(lin, q)
    x = torch.randn(1, 3, 576, generator=gen)
    with torch.inference_mode():
        ref = F.linear(x, q.dequantize(), lin.bias.detach())
        _forbid_dequantize(monkeypatch)
        y = layer(x)
        first = layer._plan
        layer(x)
    assert layer._plan is first and first.covered
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_generate_on_quantized_smollm2_uses_the_kernels(smollm2_2layers, monkeypatch):
    model, tok = smollm2_2layers
    ids = tok("The tower is 324 metres tall, about the same height as", return_tensors="pt").input_ids
    q = lowbit.quantize(copy.deepcopy(model), "w4g64", progress=False)
    with torch.inference_mode():
        want = q(ids).logits  # kernels for the few-token steps, dequantize-free prefill
    calls = []
    real = qmatmul.linear

    def spy(x, p, bias=None):
        y = real(x, p, bias)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(qmatmul, "linear", spy)
    with torch.inference_mode():
        out = q.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4 and calls and all(calls)
    monkeypatch.setattr(qmatmul, "linear", lambda *a, **k: None)  # the torch path, for reference
    with torch.inference_mode():
        ref = q(ids).logits
        ref_out = q.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.allclose(want, ref, atol=2e-3, rtol=1e-3)
    assert torch.equal(out, ref_out)


# bf16 input. gemv_bf16 (4-bit codes whose table bf16 holds exactly) multiplies bf16 codes by the
# bf16 input exactly and sums in float32, so its float32 output meets the float32 bound against
# float64 dequantize-then-matmul *of the bf16-rounded input*; linear() then rounds to bf16.
BF16_TABLE_SCHEMES = ["w4g32", "w4g64", "w4g128", "int4-g64-fp32", "int4-g128-bf16", "int4-g64-fp16-affine-intzero",
                      "mxfp4"]


@pytest.mark.parametrize("shape", SHAPES + [(5, 34), (3, 66)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", BF16_TABLE_SCHEMES)
def test_bf16_gemv_matches_float64(name, shape, gen):
    if not qmatmul.has_bf16():
        pytest.skip("this CPU lacks AVX512-BF16")
    N, K = shape
    q = lowbit.core.quantize(torch.randn(N, K, generator=gen) * torch.rand(N, 1, generator=gen), SCHEMES[name])
    p = plan(q)
    assert p.bf16_gemv
    for M in (1, 2, 3, 4, 5, 8, 16):
        x = torch.randn(M, K, generator=gen).bfloat16()
        y = qmatmul.ops().gemv_bf16(x, p.codes, p.scales, p.zeros, p.table, p.N, p.group)
        assert y.dtype == torch.float32
        check(y, x.float(), q)  # float32 output: the float32 bound, no bf16 allowance
        check(qmatmul.linear(x, p), x.float(), q)  # bf16 output: + 2^-8 |y|


def test_bf16_input_takes_gemv_bf16_only_where_the_table_is_exact(monkeypatch, gen):
    if not qmatmul.has_bf16():
        pytest.skip("this CPU lacks AVX512-BF16")
    w = torch.randn(64, 256, generator=gen)
    assert not plan(lowbit.core.quantize(w, SCHEMES["nf4"])).bf16_gemv  # nf4's levels are not bf16 values
    assert not plan(lowbit.core.quantize(w, SCHEMES["w8"])).bf16_gemv
    calls = []
    real = qmatmul.ops()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(qmatmul, "ops", lambda: Spy())
    x = torch.randn(2, 256, generator=gen).bfloat16()
    for name, want in (("w4g64", "gemv_bf16"), ("nf4", "gemv")):
        q = lowbit.core.quantize(w, SCHEMES[name])
        calls.clear()
        check(qmatmul.linear(x, plan(q)), x.float(), q)
        assert calls == [want]


def test_bf16_model_runs_the_kernels_on_the_same_codes(smollm2_2layers, monkeypatch):
    """lowbit.quantize, then .to(bfloat16): the codes stay as stored, every layer runs a kernel
    with bf16 input, and the logits match the torch path's bf16 forward."""
    model, tok = smollm2_2layers
    ids = tok("The tower is 324 metres tall, about the same height as", return_tensors="pt").input_ids
    q = lowbit.quantize(copy.deepcopy(model), "w4g64", progress=False)
    codes = {n: m.qweight.codes.clone() for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    q = q.to(torch.bfloat16)
    for n, m in q.named_modules():
        if isinstance(m, QuantLinear):
            assert m.dtype == torch.bfloat16 and torch.equal(m.qweight.codes, codes[n])
    calls = []
    real = qmatmul.linear

    def spy(x, p, bias=None):
        y = real(x, p, bias)
        calls.append((x.dtype, y is not None and y.dtype))
        return y

    monkeypatch.setattr(qmatmul, "linear", spy)
    with torch.inference_mode():
        want = q(ids).logits
        out = q.generate(ids, max_new_tokens=4, do_sample=False)
    assert calls and all(c == (torch.bfloat16, torch.bfloat16) for c in calls)
    monkeypatch.setattr(qmatmul, "linear", lambda *a, **k: None)
    with torch.inference_mode():
        ref = q(ids).logits
    assert want.dtype == torch.bfloat16 and out.shape[1] == ids.shape[1] + 4
    # bf16 activations through two layers: agree to bf16 precision relative to the logits' scale
    assert (want.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()


def test_prefill_bf16_opt_in(monkeypatch, gen):
    """LOWBIT_PREFILL=bf16: x and W rounded to bf16 (2^-9 relative each), products summed in
    float32, the result rounded to bf16 (2^-9 |y|) and widened: within
    2^-7 (|x| @ |W|^T) + 2^-8 |y| + the float32 bound of float64. Off by default."""
    w = torch.randn(256, 576, generator=gen)
    q = lowbit.core.quantize(w, SCHEMES["w4g64"])
    x = torch.randn(100, 576, generator=gen)
    assert not qmatmul.PREFILL_BF16
    monkeypatch.setattr(qmatmul, "PREFILL_BF16", True)
    y = qmatmul.linear(x, plan(q))
    assert y.dtype == torch.float32
    wd = q.dequantize()
    ref = F.linear(x.double(), wd.double())
    tol = 2.0 ** -7 * (x.double().abs() @ wd.double().abs().T) + 2.0 ** -8 * ref.abs() + bound(x, wd)
    assert ((y.double() - ref).abs() <= tol).all()
    assert (y - F.linear(x, wd)).abs().max() > 0  # it did run in bf16
    monkeypatch.setenv("LOWBIT_PREFILL", "fp16")
    with pytest.raises(ValueError, match="LOWBIT_PREFILL"):
        qmatmul._prefill_setting()


@pytest.mark.parametrize("name", ["nvfp4", "w4g64-hqq", "int8-g32-output-axis"])
def test_prefill_route_of_groups_of_16_and_output_axis_groups(name, gen):
    w = torch.randn(70, 1000, generator=gen)
    q = lowbit.core.quantize(w, SCHEMES[name])
    x = torch.randn(40, 1000, generator=gen)
    check(qmatmul.linear(x, plan(q)), x, q)
    xb = x.bfloat16()
    assert torch.equal(qmatmul.linear(xb, plan(q)), F.linear(xb, q.dequantize(torch.bfloat16)))


def int8_activations_reference(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """x with each token quantized per 64-block to int8 (scale max|x| / 127, round half to even)
    as the int8 GEMV does, up to the last whole 128-element step; the ragged end as given."""
    K = x.shape[-1]
    whole = K // 128 * 128
    xb = x[:, :whole].reshape(x.shape[0], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)  # `127.0 / t` is 127 * (1 / t): 2 roundings
    xq = torch.round(xb * inv) * (amax / 127.0)
    return torch.cat([xq.reshape(x.shape[0], whole), x[:, whole:]], dim=1)


@pytest.mark.parametrize("name", ["w4g64", "w4g128", "int4-g64-fp32", "int4-g128-bf16"])
@pytest.mark.parametrize("shape", SHAPES + [(40, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_int8_activation_gemv_matches_float64_with_the_same_quantized_x(name, shape, gen):
    if not qmatmul.has_i8():
        pytest.skip("this CPU lacks AVX512-VNNI")
    N, K = shape
    q = lowbit.core.quantize(torch.randn(N, K, generator=gen), SCHEMES[name])
    p = plan(q)
    assert p.i8_gemv
    for M in (1, 2, 3):
        x = torch.randn(M, K, generator=gen) * torch.rand(1, K, generator=gen) * 4  # uneven blocks
        with qmatmul.int8_activations():
            y = qmatmul.linear(x, p)
        check(y, int8_activations_reference(x), q)
        plain = F.linear(x.double(), q.dequantize().double())  # and what rounding x costs
        assert (y.double() - plain).abs().max() <= 0.02 * plain.abs().max()


def test_int8_activations_decode_is_opt_in_and_bf16_prefill_is_auto(gen, monkeypatch):
    q = lowbit.core.quantize(torch.randn(64, 256, generator=gen), SCHEMES["w4g64"])
    p = plan(q)
    x = torch.randn(1, 256, generator=gen)
    plain = qmatmul.ops().gemv(x, p.codes, p.scales, p.zeros, p.table, p.N, p.group, p.decoder, p.scale_mul, 0)
    assert torch.equal(qmatmul.linear(x, p), plain)
    with qmatmul.int8_activations():
        assert not torch.equal(qmatmul.linear(x, p), plain)
    xs = torch.randn(40, 256, generator=gen)
    gemm = qmatmul.gemm_i8(xs, p)
    exact = F.linear(xs, q.dequantize())
    assert torch.equal(qmatmul.linear(xs, p), exact)  # auto: float32 prefill stays exact
    gemm_b = qmatmul.gemm_i8(xs.bfloat16(), p)
    assert torch.equal(qmatmul.linear(xs.bfloat16(), p), gemm_b.bfloat16())  # bf16 prefill: int8
    with qmatmul.activations("int8"):
        assert torch.equal(qmatmul.linear(xs, p), gemm)
    with qmatmul.activations("float"):
        xb = xs.bfloat16()
        assert torch.equal(qmatmul.linear(xb, p), F.linear(xb, q.dequantize(torch.bfloat16)))
    qn = lowbit.core.quantize(torch.randn(64, 256, generator=gen), SCHEMES["nf4"])  # levels fitted: auto takes it
    pn, xb = plan(qn), xs.bfloat16()
    assert torch.equal(qmatmul.linear(xb, pn), qmatmul.gemm_i8(xb, pn).bfloat16())
    with qmatmul.activations("float"):
        assert torch.equal(qmatmul.linear(xb, pn), F.linear(xb, qn.dequantize(torch.bfloat16)))
    if qmatmul.has_lut8():  # fp8 levels on an int8 grid: auto takes it too, float does not
        q8 = lowbit.core.quantize(torch.randn(64, 256, generator=gen), SCHEMES["fp8"])
        p8 = plan(q8)
        assert torch.equal(qmatmul.linear(xb, p8), qmatmul.gemm_i8(xb, p8).bfloat16())
        with qmatmul.activations("float"):
            assert torch.equal(qmatmul.linear(xb, p8), F.linear(xb, q8.dequantize(torch.bfloat16)))
    with pytest.raises(ValueError, match="activations"):
        with qmatmul.activations("int4"):
            pass
    monkeypatch.setenv("LOWBIT_ACTIVATIONS", "fp8")
    with pytest.raises(ValueError, match="LOWBIT_ACTIVATIONS"):
        qmatmul._activations_setting()


def gemm_x_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the prefill GEMM quantizes it: each token per block of `block` inputs (the last one
    shorter), scale max|x| / 127, round half to even."""
    M, K = x.shape
    blocks = -(-K // block)
    xp = torch.zeros(M, blocks * block)
    xp[:, :K] = x.float()
    xb = xp.reshape(M, blocks, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)  # `127.0 / t` is 127 * (1 / t): 2 roundings
    return (torch.round(xb * inv) * (amax / 127.0)).reshape(M, -1)[:, :K]


def gemm_weight_reference(q: QTensor, p) -> QTensor | torch.Tensor:
    """The weight the prefill GEMM multiplies: q itself where its levels are exact in 8 bits, else
    [N, K] float64 with each level (4-bit nf4, 8-bit fp8) rounded to the GEMM's byte table."""
    c = p.i8_gemm
    if c.exact:
        return q
    N, K = q.shape
    levels = (c.table.double()[q.unpack_codes().reshape(N, K).long()] - c.offset) * c.scale_mul * p.scale_mul
    per_k = lambda t: t.double().reshape(-1, 1).expand(N, 1) if t.numel() == 1 else \
        t.double().reshape(N, -1).repeat_interleave(p.group, dim=1)[:, :K]  # per tensor, or per row / group
    z = q.zero_values()
    return (levels - (0 if z is None else per_k(z))) * per_k(q.scale_values())


def gemm_offset_weight(q: QTensor, p) -> torch.Tensor:
    """[N, K] float64: the weight whose codes all read as the GEMM's byte offset."""
    N, K = q.shape
    c = p.i8_gemm
    s = q.scale_values().double().abs().reshape(-1)
    per_k = s.expand(N).reshape(N, 1).expand(N, K) if s.numel() == 1 else \
        s.reshape(N, -1).repeat_interleave(p.group, dim=1)[:, :K]
    return c.offset * abs(c.scale_mul * p.scale_mul) * per_k


GEMM_I8 = ["w4g64", "w4g128", "w4g32", "int4-g64-fp32", "int4-g128-bf16", "int4-g64-fp16-affine-intzero", "w8",
           "uint8-channel-affine", "int8-g128", "mxfp4", "nf4", "nf4-dq", "fp8", "fp8_e5m2-channel", "fp8-tensor",
           "mxfp8"]
ROUNDED = ("nf4", "nf4-dq", "fp8", "fp8_e5m2-channel", "fp8-tensor", "mxfp8")  # levels rounded to 8 bits


def check_gemm(y, x, q, p):
    """check() against the weight gemm_i8 reads (nf4: its levels rounded to 8 bits)."""
    w = gemm_weight_reference(q, p)
    if isinstance(w, QTensor):
        return check(y, x, w)
    ref = x.double() @ w.T
    # the codes are read as bytes u = level + offset and the offset's product subtracted after: float32
    # rounds terms as large as the offset's level, which per tensor exceeds a small row's weights
    tol = bound(x, w) + bound(x, gemm_offset_weight(q, p))
    assert ((y.double() - ref).abs() <= tol + 1e-30).all()
    exact = F.linear(x.double(), q.dequantize().double())  # and what rounding the levels costs: 1/254 of the peak
    peak = q.scale_values().double().abs().max() * p.i8_gemm.scale_mul * p.scale_mul * 127
    assert ((y.double() - exact).abs() <= peak / 254 * x.double().abs().sum(-1, keepdim=True) + bound(x, w)).all()


@pytest.mark.parametrize("name", GEMM_I8)
@pytest.mark.parametrize("shape", SHAPES + [(40, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_int8_prefill_gemm_matches_float64_with_the_same_quantized_x(name, shape, gen):
    N, K = shape
    q = lowbit.core.quantize(torch.randn(N, K, generator=gen) * torch.rand(N, 1, generator=gen), SCHEMES[name])
    p = plan(q)
    if "fp8" in name and not qmatmul.has_lut8():  # its 256-byte table needs AVX512-VBMI
        assert p.i8_gemm is None
        return
    assert p.i8_gemm is not None, f"{name} should have the int8 prefill GEMM"
    assert p.i8_gemm.exact == (name not in ROUNDED)
    block = 64 if p.group % 64 == 0 or p.group == K else 32
    for M, dtype in ((17, torch.float32), (40, torch.bfloat16), (7, torch.float32)):
        x = (torch.randn(M, K, generator=gen) * torch.rand(1, K, generator=gen) * 4).to(dtype)  # uneven blocks
        y = qmatmul.gemm_i8(x, p)
        check_gemm(y, gemm_x_reference(x, block), q, p)
        plain = F.linear(x.double(), q.dequantize().double())  # and what rounding x costs
        assert (y.double() - plain).abs().max() <= 0.02 * plain.abs().max()


def test_byte_codebook_is_the_least_squares_grid_over_multipliers(gen):
    """nf4's levels in bytes: no multiplier m in 64..127.49 with its least-squares gain g, checked by
    brute force in float64, rounds closer than the chosen one, and none is coarser than 1/254."""
    from lowbit.formats.codebook import NF4_VALUES
    from lowbit.nn.kernel_plan import _byte_codebook
    rand = [torch.rand(16, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(20)]
    for t in [torch.tensor(NF4_VALUES, dtype=torch.float64)] + rand:
        t = t / t.abs().max()
        levels, gain = _byte_codebook(t)
        assert torch.equal(levels, levels.round()) and levels.abs().max() <= 128
        err = float(((levels * gain - t) ** 2).sum())
        assert (levels * gain - t).abs().max() <= 1 / 254 + 1e-12
        plain = (t * 127).round()  # the old table: m = 127, gain 1 / 127
        assert err <= float(((plain / 127 - t) ** 2).sum())
        for m in (64.0, 90.5, 111.74, 127.0, 127.4):
            lv = (t * m).round().clamp(-128, 127)
            g = float(lv @ t / (lv @ lv))
            if (lv * g - t).abs().max() <= 1 / 254:
                assert err <= float(((lv * g - t) ** 2).sum()) + 1e-15


@pytest.mark.parametrize("name", ["w4g64", "nf4", "fp8"])
def test_int8_prefill_gemm_on_smollm2_weights(name, smollm2_weights, gen):
    for w in smollm2_weights.values():
        q = lowbit.core.quantize(w, SCHEMES[name])
        x = torch.randn(33, w.shape[1], generator=gen).bfloat16()
        p = plan(q)
        if p.i8_gemm is None:  # fp8 on a CPU without AVX512-VBMI
            assert name == "fp8" and not qmatmul.has_lut8()
            continue
        check_gemm(qmatmul.gemm_i8(x, p), gemm_x_reference(x, 64), q, p)
