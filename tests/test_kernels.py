"""Fast paths are pinned, bit for bit, to the pure-torch code they replace."""
import math

import pytest
import torch

from lowbit import formats, kernels, quantize_tensor
from lowbit.core import grid, pack_bits_le
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
