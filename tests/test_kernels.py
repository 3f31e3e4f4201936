"""Fast paths are pinned, bit for bit, to the pure-torch code they replace."""
import contextlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit import formats, kernels, quantize_tensor
from lowbit.core import grid, make_scheme, pack_bits_le
from lowbit.core.granularity import GroupView, make_granularity
from lowbit.core.grid import encode_packed, encode_part
from lowbit.core.ranges import full_range

FAST = ["int2", "int3", "int4", "int8", "uint1", "uint4", "uint8", "fp8_e4m3", "fp4_e2m1",
        "nf4", "fp4_bnb", "ternary", "binary"]


def reference_codes(y: torch.Tensor, fmt) -> torch.Tensor:
    """What core/grid.py computes without kernels (round to nearest, saturating)."""
    if isinstance(fmt, formats.IntFormat):
        return fmt.encode_integers(torch.clamp(torch.round(y), fmt.qmin, fmt.qmax))
    return fmt.encode(y, saturate=True)


def edge_values(fmt, gen: torch.Generator) -> torch.Tensor:
    """Fresh random values at every scale, plus the grid, its midpoints (ties) and their
    float32 neighbours, subnormals, overflow, +-0 and +-Inf."""
    v = fmt.values.float()
    mids = (v[1:] + v[:-1]) / 2
    ties = torch.cat([v, mids, -mids])
    near = torch.cat([torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    spread = torch.randn(20_000, generator=gen) * 10.0 ** torch.randint(-8, 4, (20_000,), generator=gen)
    uniform = (torch.rand(20_000, generator=gen) * 2 - 1) * float(v.abs().max()) * 1.2
    specials = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-38, 3e38, -3e38, math.inf, -math.inf,
                             fmt.max * 2, -fmt.max * 2, fmt.max * 1.0001, 464.0, -464.0, 480.0])
    return torch.cat([ties, near, spread, uniform, specials])


@pytest.mark.parametrize("name", FAST)
def test_encode_nearest_matches_the_reference(name, gen):
    fmt = formats.get(name)
    y = edge_values(fmt, gen)
    fast = kernels.encode_nearest(y.clone(), fmt)
    assert fast is not None, f"{name} should have a fast path"
    ref = reference_codes(y, fmt)
    assert fast.dtype == ref.dtype == torch.uint8
    bad = fast != ref
    assert not bad.any(), f"{name}: {y[bad][:5].tolist()} -> {fast[bad][:5].tolist()}, want {ref[bad][:5].tolist()}"


@pytest.mark.parametrize("name", FAST)
def test_encode_nearest_declines_nan(name):
    y = torch.tensor([1.0, math.nan, -2.0])
    assert kernels.encode_nearest(y, formats.get(name)) is None


@pytest.mark.parametrize("name", ["fp8_e5m2", "fp6_e2m3", "dynamic8", "q3.4", "fp16"])
def test_encode_nearest_declines_formats_without_a_fast_path(name):
    assert kernels.encode_nearest(torch.randn(10), formats.get(name)) is None


@pytest.mark.parametrize("kind, kw", [("group", dict(group_size=128)), ("group", dict(group_size=32)),
                                      ("channel", {}), ("token", {}), ("tensor", {})])
@pytest.mark.parametrize("name", ["int4", "uint4", "int3", "int8", "fp8_e4m3", "fp4_e2m1", "nf4", "fp6_e3m2"])
def test_chunked_encode_packed_matches_encoding_at_once(monkeypatch, gen, kind, kw, name):
    monkeypatch.setattr(grid, "CHUNK", 1000)  # many chunks and a short last one
    fmt = formats.get(name)
    x = torch.randn(203, 256, generator=gen) * torch.rand(203, 1, generator=gen)
    view = GroupView(tuple(x.shape), make_granularity(kind, **kw))
    assert view.row_major
    parts = view.parts(x)
    s = [p.abs().amax(1, keepdim=True).clamp(min=1e-3) / fmt.max for p in parts]
    z = [torch.full_like(c, 3.0) if name == "uint4" else None for c in s]
    codes = [encode_part(p, c, zz, fmt) for p, c, zz in zip(parts, s, z)]
    want = pack_bits_le(view.merge(codes).contiguous(), fmt.bits)
    assert torch.equal(encode_packed(view, parts, s, z, fmt, fmt.bits), want)


def test_encode_part_with_and_without_kernels_agree(monkeypatch, gen):
    x = torch.randn(64, 96, generator=gen)
    s = x.abs().amax(1, keepdim=True) / 7
    z = torch.randint(-3, 4, (64, 1), generator=gen).float()
    for name in ["int4", "uint4", "fp8_e4m3", "nf4"]:
        fmt = formats.get(name)
        zz = z + 8 if name == "uint4" else None
        fast = encode_part(x, s, zz, fmt)
        monkeypatch.setattr(kernels, "encode_nearest", lambda y, f: None)
        slow = encode_part(x, s, zz, fmt)
        monkeypatch.undo()
        assert torch.equal(fast, slow), name


def test_full_range_equals_abs_max(gen):
    x = torch.randn(50, 33, generator=gen)
    x[0] = 0.0
    x[1] = -0.0
    x[2, 5] = -7.0
    lo, hi = full_range(x, symmetric=True)
    amax = x.abs().amax(1, keepdim=True)
    assert torch.equal(hi.view(torch.int32), amax.view(torch.int32))  # +0.0 for zero rows, bit for bit
    assert torch.equal(lo.view(torch.int32), (-amax).view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme, kw", [("int4", dict(granularity="group", group_size=128)),
                                        ("int4", dict(granularity="group", group_size=128, symmetric=False)),
                                        ("fp8_e4m3", dict(granularity="channel")), ("nf4", {}),
                                        ("mxfp4", {}), ("nvfp4", {}), ("int4", dict(range="mse", group_size=64))])
def test_narrow_inputs_quantize_like_their_float32_values(gen, dtype, scheme, kw):
    x = (torch.randn(40, 576, generator=gen) * 0.05).to(dtype)
    a, b = quantize_tensor(x, scheme, **kw), quantize_tensor(x.float(), scheme, **kw)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scale_values(), b.scale_values())


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_word_packing_matches_byte_packing(bits, gen):
    codes = torch.randint(0, 2**bits, (8 * 1001,), dtype=torch.uint8, generator=gen)
    per = 8 // bits
    cols = codes.view(-1, per)
    want = cols[:, 0].clone()
    for j in range(1, per):
        want |= cols[:, j] << (bits * j)
    assert torch.equal(pack_bits_le(codes, bits), want)
    assert torch.equal(pack_bits_le(codes[1:1 + per * 10], bits), pack_bits_le(codes[1:1 + per * 10].clone(), bits))


# -- the fused one-pass kernel (kernels/fused.py, numba) ---------------------------------------


@contextlib.contextmanager
def fused_kernel(enabled: bool):
    """Run quantize_tensor with the fused kernel switched off (the reference path), or on and
    checked to have run: a test that silently fell back would compare the reference with itself."""
    real, ran = kernels.quantize_rows, []

    def spy(*args):
        out = real(*args) if enabled else None
        ran.append(out is not None)
        return out

    kernels.quantize_rows = spy
    try:
        yield
    finally:
        kernels.quantize_rows = real
    assert not enabled or ran == [True], f"the fused kernel did not run (calls: {ran})"


def bits_of(t: torch.Tensor | None):
    """A tensor's exact bits (float -0.0 and 0.0 differ, as do NaN payloads)."""
    if t is None or not t.is_floating_point():
        return t
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_fused_matches_reference(x: torch.Tensor, fmt: str, integer_zero: bool = False, **kw):
    if integer_zero:  # not a quantize_tensor keyword: build the Scheme
        unset = dict.fromkeys(["granularity", "group_size", "axis", "block", "symmetric", "scale_format", "range",
                               "percentile", "rounding"])
        fmt, kw = make_scheme(fmt, **{**unset, **kw}).replace(integer_zero=True), {}
    with fused_kernel(False):
        want = quantize_tensor(x, fmt, **kw)
    with fused_kernel(True):
        got = quantize_tensor(x, fmt, **kw)
    assert torch.equal(got.codes, want.codes), f"codes differ at {torch.nonzero(got.codes != want.codes)[:5].tolist()}"
    assert got.scales.dtype == want.scales.dtype and got.scales.shape == want.scales.shape
    assert torch.equal(bits_of(got.scales), bits_of(want.scales))
    assert (got.zeros is None) == (want.zeros is None)
    if want.zeros is not None:
        assert got.zeros.dtype == want.zeros.dtype and torch.equal(bits_of(got.zeros), bits_of(want.zeros))
    assert got.tensor_scale is None and want.tensor_scale is None
    assert torch.equal(bits_of(got.dequantize()), bits_of(want.dequantize()))


def awkward_weights(rows: int, cols: int, gen: torch.Generator, scale_max: float = 1.0) -> torch.Tensor:
    """Rows at many scales, plus the cases that break kernels: an all-zero row, -0.0, a
    constant row, a row whose groups sit on exact ties (amax = 7 or 448 gives s = 1, so
    x / s lands on halves and fp8 midpoints), subnormals and a lone outlier."""
    x = torch.randn(rows, cols, generator=gen) * 10.0 ** torch.randint(-6, 3, (rows, 1), generator=gen)
    x = x * scale_max
    specials = [torch.zeros(cols), torch.full((cols,), -0.0), torch.full((cols,), -0.37),
                torch.cat([torch.tensor([7.0, -448.0]), torch.arange(cols) % 15 - 7.5]),
                torch.full((cols,), 1e-42) * torch.randn(cols, generator=gen).sign(),
                torch.cat([torch.tensor([3e4]), torch.randn(cols, generator=gen) * 1e-3])]
    for i, row in enumerate(specials[:rows]):
        x[i] = row[:cols]
    return x


INT_SCHEMES = [("int4", dict(granularity="group", group_size=128)),
               ("int4", dict(granularity="group", group_size=128, symmetric=False)),
               ("int4", dict(granularity="group", group_size=64, symmetric=False, integer_zero=True)),
               ("uint4", dict(granularity="group", group_size=32, symmetric=False)),
               ("int8", dict(granularity="channel")),
               ("int8", dict(granularity="token", symmetric=False)),
               ("uint8", dict(granularity="group", group_size=100, symmetric=False)),  # ragged
               ("int2", dict(granularity="group", group_size=64)),
               ("int3", dict(granularity="group", group_size=64, scale_format="fp16")),
               ("int5", dict(granularity="group", group_size=40, symmetric=False)),  # ragged
               ("int6", dict(granularity="channel", scale_format="bf16")),
               ("int4", dict(granularity="group", group_size=128, scale_format="fp16", symmetric=False)),
               ("int4", dict(granularity="group", group_size=128, scale_format="bf16")),
               ("fp8_e4m3", dict(granularity="channel")),
               ("fp8_e4m3", dict(granularity="group", group_size=64)),
               ("fp8_e4m3", dict(granularity="group", group_size=100, scale_format="fp16")),  # ragged
               ("fp8_e4m3", dict(granularity="token", scale_format="bf16")),
               ("nf4", {}),
               ("fp4_e2m1", dict(granularity="group", group_size=32)),
               ("fp4_bnb", dict(granularity="group", group_size=100, scale_format="fp16")),  # ragged
               ("ternary", dict(granularity="channel", scale_format="bf16")),
               ("mxfp4", {}), ("mxint8", {}), ("mxfp8", {}),  # E8M0 scales
               ("nf4", dict(scale_format="e8m0"))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt, kw", INT_SCHEMES)
def test_fused_kernel_matches_the_reference(gen, dtype, fmt, kw):
    scale_max = 1e-3 if kw.get("scale_format") == "fp16" or dtype == torch.float16 else 1.0
    x = awkward_weights(48, 320, gen, scale_max).to(dtype)
    if dtype == torch.float16:
        x = torch.where(x.isinf(), torch.zeros_like(x), x)
    assert_fused_matches_reference(x, fmt, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt, kw", [("int4", dict(granularity="group", group_size=128)),
                                     ("int4", dict(granularity="group", group_size=128, symmetric=False)),
                                     ("fp8_e4m3", dict(granularity="channel"))])
def test_fused_kernel_matches_the_reference_on_smollm2(smollm2_weights, dtype, fmt, kw):
    for w in smollm2_weights.values():
        assert_fused_matches_reference(w.to(dtype), fmt, **kw)


@given(rows=st.integers(1, 9), cols=st.one_of(st.integers(1, 300), st.integers(1, 37).map(lambda k: 8 * k)),
       group=st.one_of(st.integers(1, 300), st.sampled_from([8, 16, 32, 64, 128])), seed=st.integers(0, 2**31),
       fmt=st.sampled_from(["int2", "int3", "int4", "int8", "uint4", "uint8", "fp8_e4m3", "nf4", "fp4_e2m1"]),
       symmetric=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       scale_format=st.sampled_from(["fp32", "fp16", "bf16", "e8m0"]), integer_zero=st.booleans(),
       kind=st.sampled_from(["group", "channel", "token"]))
def test_fused_kernel_matches_the_reference_on_any_shape(rows, cols, group, seed, fmt, symmetric, dtype,
                                                         scale_format, integer_zero, kind):
    symmetric = symmetric and not fmt.startswith("uint") or not fmt.startswith(("int", "uint"))
    scale_format = "fp32" if scale_format == "e8m0" and not symmetric else scale_format  # E8M0 has no zero points
    kw = dict(granularity=kind, symmetric=symmetric, scale_format=scale_format,
              integer_zero=integer_zero and not symmetric)
    if kind == "group":
        kw["group_size"] = group
    x = awkward_weights(rows, cols, torch.Generator().manual_seed(seed), 1e-3).to(dtype)
    bits = formats.get(fmt).bits
    n, g = (cols, min(group, cols)) if kind != "channel" else (cols, cols)
    if n * bits % 8 or g * bits % 8:  # groups off byte boundaries: the kernel declines
        assert kernels.quantize_rows(x, n, g, formats.get(fmt), symmetric, scale_format, kw["integer_zero"]) is None
        return
    assert_fused_matches_reference(x, fmt, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_fp8_codes_match_torch_on_edge_values(gen, dtype):
    """With a row absmax of 448 the scale is 1, so y = x: every tie, midpoint neighbour,
    subnormal and the saturation edge of fp8_e4m3 reaches the encoder unscaled."""
    v = edge_values(formats.get("fp8_e4m3"), gen)
    v = v[torch.isfinite(v)].clamp(-448, 448)
    v = v[: v.numel() // 255 * 255].reshape(-1, 255)
    x = torch.cat([torch.full((v.shape[0], 1), 448.0), v], dim=1).to(dtype)
    assert_fused_matches_reference(x, "fp8_e4m3", granularity="channel")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fmt, kw", [("int4", dict(group_size=128)), ("fp8_e4m3", dict(granularity="channel")),
                                     ("int4", dict(group_size=128, symmetric=False))])
def test_fused_kernel_declines_nan_and_inf_and_the_error_stays(bad, fmt, kw):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(8, 256).to(dtype)
        x[5, 77] = bad
        assert kernels.quantize_rows(x, 256, 256 if "granularity" in kw else 128, formats.get(fmt),
                                     kw.get("symmetric", True), "fp32", False) is None
        with pytest.raises(ValueError, match="NaN"):
            quantize_tensor(x, fmt, **kw)


def test_fused_kernel_declines_where_the_reference_raises_or_differs():
    x = torch.randn(4, 256) * 1e6
    with pytest.raises(ValueError, match="exceeds the largest fp16"):
        quantize_tensor(x, "int4", group_size=128, scale_format="fp16")
    x = torch.full((4, 256), 1e-45)  # absmax / 7 is 0 in float32: the reference divides by zero
    assert kernels.quantize_rows(x, 256, 128, formats.get("int4"), True, "fp32", False) is None
    int4 = formats.get("int4")
    with pytest.raises(ValueError, match="cannot hold them"):
        quantize_tensor(torch.randn(4, 256), "int4", group_size=32, symmetric=False, scale_format="e8m0")
    assert kernels.quantize_rows(torch.randn(4, 256).t(), 4, 4, int4, True, "fp32", False) is None
    assert kernels.quantize_rows(torch.randn(4, 256).double(), 256, 128, int4, True, "fp32", False) is None
    assert kernels.quantize_rows(torch.randn(4, 256), 256, 128, formats.get("fp6_e2m3"), True, "fp32", False) is None
    assert kernels.quantize_rows(torch.randn(4, 256), 256, 128, int4, True, "fp8_e4m3", False) is None
    assert kernels.quantize_rows(torch.randn(4, 255), 255, 255, int4, True, "fp32", False) is None


@pytest.mark.parametrize("fmt, kw", [("mxfp6", {}), ("nvfp4", {}), ("nf4-dq", {}), ("int4", dict(range="mse", group_size=64)),
                                     ("int4", dict(rounding="stochastic", group_size=64)),
                                     ("int4", dict(granularity="group", group_size=64, axis=0)),
                                     ("int4", dict(granularity="tensor"))])
def test_schemes_the_kernel_does_not_cover_take_the_reference_path(fmt, kw):
    calls = []
    real = kernels.quantize_rows
    kernels.quantize_rows = lambda *a: calls.append(a) or real(*a)
    try:
        q = quantize_tensor(torch.randn(64, 128), fmt, **kw)
    finally:
        kernels.quantize_rows = real
    assert q.dequantize().shape == (64, 128)
    assert all(real(*a) is None for a in calls)


def test_fused_kernel_from_several_python_threads_at_once(gen):
    from concurrent.futures import ThreadPoolExecutor

    xs = [torch.randn(256, 512, generator=gen) for _ in range(6)]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda x: quantize_tensor(x, "int4", group_size=128), xs))
    for x, q in zip(xs, got):
        assert torch.equal(q.codes, quantize_tensor(x, "int4", group_size=128).codes)
