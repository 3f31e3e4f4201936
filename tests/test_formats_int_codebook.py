"""Integer, fixed-point and codebook formats against slow obvious references."""
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy.stats import norm

from lowbit import formats
from lowbit.formats.codebook import NF4_VALUES, dynamic_tree_values, normal_float_values


@pytest.mark.parametrize("name", [f"int{b}" for b in range(2, 9)] + [f"uint{b}" for b in range(1, 9)])
def test_integer_formats_round_half_even_and_clamp(name):
    f = formats.get(name)
    signed = name.startswith("int")
    bits = int(name.lstrip("uint"))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    x = torch.cat([torch.randn(20_000) * 2**bits, torch.arange(lo - 3, hi + 3) + 0.5])
    ref = np.clip(np.round(x.double().numpy()), lo, hi)  # numpy rounds half to even
    assert np.array_equal(f.round(x).double().numpy(), ref)
    codes = f.encode(x)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
    assert f.values.tolist() == list(range(lo, hi + 1))
    assert (f.max, f.min) == (hi, lo)


def test_integer_saturate_false_raises_and_nan_raises():
    f = formats.get("int4")
    with pytest.raises(ValueError, match="outside"):
        f.encode(torch.tensor([9.0]), saturate=False)
    with pytest.raises(ValueError, match="NaN"):
        f.encode(torch.tensor([float("nan")]))


def test_int4_codes_are_twos_complement_patterns():
    f = formats.get("int4")
    assert f.encode(torch.tensor([-1.0, -8.0, 7.0, 0.0])).tolist() == [15, 8, 7, 0]
    assert f.decode(torch.tensor([15, 8, 7, 0], dtype=torch.uint8)).tolist() == [-1.0, -8.0, 7.0, 0.0]


@given(m=st.integers(0, 7), n=st.integers(0, 8), x=st.lists(st.floats(-300, 300), min_size=1, max_size=50))
def test_fixed_point_matches_scaled_integer_rounding(m, n, x):
    assume(2 <= 1 + m + n <= 16)
    f = formats.get(f"q{m}.{n}")
    t = torch.tensor(x, dtype=torch.float64)
    k = np.clip(np.round(t.numpy() * 2.0**n), -(2 ** (m + n)), 2 ** (m + n) - 1)
    assert np.array_equal(f.round(t).double().numpy(), k / 2.0**n)
    assert f.bits == 1 + m + n and f.eps == 2.0**-n


def test_nf4_table_is_the_qlora_construction():
    # Independent reconstruction with scipy's normal quantiles.
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    v /= np.abs(v).max()
    assert np.allclose(v, NF4_VALUES, atol=2e-7)
    assert np.allclose(normal_float_values(4), NF4_VALUES, atol=2e-7)
    assert formats.get("nf4").values.tolist() == NF4_VALUES


def test_dynamic_maps_have_256_values_in_unit_range():
    for signed in (True, False):
        v = np.array(dynamic_tree_values(signed=signed))
        assert len(np.unique(v)) == 256 and v.max() == 1.0 and 0.0 in v
        assert (v.min() < -0.99) if signed else (v.min() == 0.0)
    # The smallest non-zero magnitude is 10^-6 times a fraction midpoint, as in the paper (to
    # float32 precision: the map is built in float32, as bitsandbytes builds it).
    v = np.array(dynamic_tree_values(signed=True))
    assert math.isclose(np.abs(v[v != 0]).min(), 0.55e-6, rel_tol=2e-7)


@pytest.mark.parametrize("name", ["nf4", "fp4_bnb", "dynamic8", "dynamic8_unsigned", "ternary", "binary"])
def test_codebook_rounds_to_nearest_value(name):
    f = formats.get(name)
    v = f.values.double()
    x = torch.cat([torch.randn(50_000, dtype=torch.float64) * 0.6, v, (v[1:] + v[:-1]) / 2, torch.tensor([-5.0, 5.0])])
    got = f.round(x.float()).double()
    dist = (x.float().double()[:, None] - v[None, :]).abs()
    best = dist.min(dim=1).values
    assert torch.allclose((x.float().double() - got).abs(), best, rtol=0, atol=1e-7)
    # ties go to the value nearer zero
    mids = ((v[1:] + v[:-1]) / 2).float()
    tie = f.round(mids).double()
    lower, upper = v[:-1], v[1:]
    nearer_zero = torch.where(lower.abs() <= upper.abs(), lower, upper)
    exact = mids.double() == (v[1:] + v[:-1]) / 2
    assert torch.equal(tie[exact], nearer_zero[exact].float().double())


def test_fp4_bnb_values():
    v = formats.get("fp4_bnb").values
    assert v.numel() == 15 and float(v.max()) == 1.0 and math.isclose(float(v[v > 0].min()), 1 / 192)


def test_kmeans_codebook_is_reproducible_and_beats_uniform():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) ** 3  # heavy tails: a learned codebook should shine
    a, b = formats.kmeans(x, 4, seed=3), formats.kmeans(x, 4, seed=3)
    assert torch.equal(a.values, b.values) and a.values.numel() == 16
    err_k = (a.round(x) - x).pow(2).mean()
    amax = x.abs().max()
    err_u = (formats.get("int4").round(x / amax * 7) * amax / 7 - x).pow(2).mean()
    assert err_k < err_u / 2


def test_kmeans_per_group_is_a_lloyd_fixed_point():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 200, generator=g)
    c = formats.fit_centroids(x, 8, seed=5)
    assert torch.equal(c, formats.fit_centroids(x, 8, seed=5))
    # Lloyd fixed point: each centroid is the mean of the values assigned to it.
    idx = formats.kmeans_assign(x, c)
    for i in range(6):
        for j in range(8):
            sel = x[i][idx[i] == j]
            if sel.numel():
                assert torch.isclose(sel.mean(), c[i, j], atol=1e-5)


def test_learned_names_explain_themselves():
    with pytest.raises(ValueError, match="learned codebook"):
        formats.get("kmeans4")
