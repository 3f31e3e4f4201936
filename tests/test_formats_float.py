"""Float formats bit-exact against ml_dtypes and torch float8 casts."""
import zlib

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit import formats

REFS = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "e8m0": ml_dtypes.float8_e8m0fnu,
    "bf16": ml_dtypes.bfloat16,
    "fp16": np.float16,
}
N_RANDOM = 1_000_000


def ref_codes(x: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        y = x.astype(REFS[name])
    bits = formats.get(name).bits
    return y.view(np.uint16 if bits > 8 else np.uint8).astype(np.int64)


def ref_values(name: str) -> np.ndarray:
    """Every code's value, decoded by the reference."""
    bits = formats.get(name).bits
    codes = np.arange(2**bits, dtype=np.uint16 if bits > 8 else np.uint8)
    with np.errstate(invalid="ignore"):  # sub-byte types live in the low bits of a byte
        return codes.view(REFS[name]).astype(np.float64)


def hard_inputs(name: str, rng: np.random.Generator) -> np.ndarray:
    """A million+ inputs: random float32 bit patterns, values spread over the format's range,
    exact ties between neighbours, the subnormal and overflow boundaries, +-0, +-Inf, NaN."""
    f = formats.get(name)
    vals = formats.get(name).values if f.bits <= 8 else None
    parts = [
        rng.integers(0, 2**32, N_RANDOM // 2, dtype=np.uint64).astype(np.uint32).view(np.float32),
        (rng.standard_normal(N_RANDOM // 4) * f.max / 8).astype(np.float32),
        (rng.standard_normal(N_RANDOM // 4) * f.smallest_normal * 2).astype(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, f.max, -f.max, f.smallest_subnormal,
                  f.smallest_subnormal / 2, f.smallest_normal, np.finfo(np.float32).max], dtype=np.float32),
    ]
    if vals is not None:
        v = vals.numpy()
        mids = (v[1:] + v[:-1]) / 2  # exact ties: midpoints of neighbours are float32-exact here
        top = f.max + (f.max - v[-2]) / 2 if name != "e8m0" else f.max * 1.5  # tie at the overflow edge
        parts.append(np.concatenate([mids, -mids, [top, -top], np.nextafter(mids, 0), np.nextafter(mids, np.inf)])
                     .astype(np.float32))
    else:  # 16-bit targets: float32 patterns whose dropped bits are exactly one half
        drop = 16 if name == "bf16" else 13
        base = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
        base = (base & ~np.uint32(2**drop - 1)) | np.uint32(2 ** (drop - 1))
        parts.append(base.view(np.float32))
    return np.concatenate(parts)


@pytest.mark.parametrize("name", list(REFS))
def test_decode_every_code_matches_reference(name):
    f = formats.get(name)
    codes = torch.arange(2**f.bits, dtype=torch.int64).to(formats.code_dtype(f.bits))
    mine = f.decode(codes).double().numpy()
    ref = ref_values(name)
    assert np.array_equal(np.isnan(mine), np.isnan(ref))
    ok = ~np.isnan(ref)
    assert np.array_equal(mine[ok], ref[ok])
    assert np.array_equal(np.signbit(mine[ok]), np.signbit(ref[ok]))  # -0 stays -0


@pytest.mark.parametrize("name", list(REFS))
def test_encode_matches_reference_without_saturation(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x = hard_inputs(name, rng)
    mine = formats.get(name).encode(torch.from_numpy(x), saturate=False).numpy().astype(np.int64)
    ref = ref_codes(x, name)
    f = formats.get(name)
    nan_in = np.isnan(x)
    if name == "fp16":  # numpy keeps NaN payloads; we return the canonical quiet NaN
        nan_code = f.decode(torch.from_numpy(mine[nan_in])).isnan().all()
        assert bool(nan_code)
        mine, ref = mine[~nan_in], ref[~nan_in]
    bad = np.flatnonzero(mine != ref)
    assert bad.size == 0, f"{bad.size} mismatches, e.g. x={x[~nan_in][bad[:4]] if name == 'fp16' else x[bad[:4]]}"
    assert len(x) >= N_RANDOM


@pytest.mark.parametrize("name,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_round_matches_torch_float8(name, dtype):
    """torch's e4m3fn cast saturates (our saturate=True); its e5m2 cast overflows to Inf."""
    rng = np.random.default_rng(7)
    x = torch.from_numpy(hard_inputs(name, rng))
    f = formats.get(name)
    ref = x.to(dtype).float()
    mine = f.round(x, saturate=(name == "fp8_e4m3"))
    assert torch.equal(torch.isnan(mine), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.equal(mine[ok], ref[ok])
    assert torch.equal(torch.signbit(mine[ok]), torch.signbit(ref[ok]))


@pytest.mark.parametrize("name", [n for n in REFS if n != "e8m0"])
def test_saturate_clamps_to_max(name):
    rng = np.random.default_rng(11)
    x = hard_inputs(name, rng)
    f = formats.get(name)
    x = x[~np.isnan(x)]
    mine = f.round(torch.from_numpy(x), saturate=True).double().numpy()
    clamped = np.clip(x.astype(np.float64), -f.max, f.max).astype(np.float32)
    ref = ref_values(name)[ref_codes(clamped, name)]
    assert np.array_equal(mine, ref)
    assert np.isfinite(mine).all()


def test_e8m0_saturate_and_specials():
    f = formats.get("e8m0")
    x = torch.tensor([0.0, -1.0, float("inf"), 2.0**200, 1.5, 3.0, 0.75])
    assert f.encode(x, saturate=False).tolist() == [255, 255, 255, 255, 128, 129, 127]
    assert f.encode(x, saturate=True).tolist() == [0, 0, 254, 254, 128, 129, 127]


E8M0_POWERS = 2.0 ** np.arange(128, -128, -1)  # 2^128 (past the top: overflow) down to 2^-127, float64-exact


def e8m0_nearest_codes(x: np.ndarray, saturate: bool) -> np.ndarray:
    """The e8m0 rule in float64 arithmetic, independent of any library's version: the power of
    two nearest x by |x - 2^e|, ties to the larger one (the candidates are listed largest first and
    argmin keeps the first minimum). Near x both differences are exact in float64 (Sterbenz).
    2^128 stands for overflow: NaN, or 2^127 when saturating; zero and negatives: NaN or 2^-127."""
    x = x.astype(np.float64)
    pos = np.isfinite(x) & (x > 0)
    idx = np.argmin(np.abs(x[pos, None] - E8M0_POWERS[None, :]), axis=1)
    e = 128 - idx
    codes = np.full(x.shape, 255, np.int64)
    codes[pos] = np.where(e > 127, 254 if saturate else 255, e + 127)
    if saturate:
        codes[np.isposinf(x)] = 254
        codes[~np.isnan(x) & ((x <= 0) | np.isneginf(x))] = 0
    return codes


def e8m0_edge_inputs() -> np.ndarray:
    """Every power of two a float32 holds (subnormals too), the midpoints 1.5 * 2^k (exact ties)
    and their float32 neighbours, the issue's 7.33e-39, the float32 extremes and the specials."""
    powers = (2.0 ** np.arange(-149, 128)).astype(np.float32)
    mids = (1.5 * 2.0 ** np.arange(-150, 128)).astype(np.float32)
    near = np.concatenate([np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
    specials = [7.33e-39, 1e-45, 2.0**-126 * 0.999, np.finfo(np.float32).max, np.finfo(np.float32).tiny,
                0.0, -0.0, -1.0, -7.33e-39, np.inf, -np.inf, np.nan]
    return np.concatenate([powers, mids, near, np.array(specials, np.float32)])


@pytest.mark.parametrize("saturate", [False, True])
def test_e8m0_rounds_to_nearest_power_of_two_on_edges(saturate):
    x = e8m0_edge_inputs()
    mine = formats.get("e8m0").encode(torch.from_numpy(x), saturate=saturate).numpy().astype(np.int64)
    want = e8m0_nearest_codes(x, saturate)
    bad = np.flatnonzero(mine != want)
    assert bad.size == 0, f"x={x[bad[:4]]} -> codes {mine[bad[:4]]}, nearest is {want[bad[:4]]}"
    assert mine[x == np.float32(7.33e-39)].tolist() == [0]  # 2^-127, not 2^-126 (issue 23)


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=300),
       st.lists(st.integers(1, 2**23 - 1), min_size=1, max_size=100), st.booleans())
def test_e8m0_rounds_float32_to_nearest_power_of_two(values, subnormal_bits, saturate):
    subnormals = np.array(subnormal_bits, np.uint32).view(np.float32)  # spread evenly over (0, 2^-126)
    x = np.concatenate([np.array(values, np.float32), subnormals])
    mine = formats.get("e8m0").encode(torch.from_numpy(x), saturate=saturate).numpy().astype(np.int64)
    assert mine.tolist() == e8m0_nearest_codes(x, saturate).tolist()


@given(st.lists(st.floats(allow_nan=False), min_size=1, max_size=300), st.booleans())
def test_e8m0_rounds_float64_to_nearest_power_of_two(values, saturate):
    x = np.array(values, np.float64)  # far below 2^-127 and past 2^128 too
    mine = formats.get("e8m0").encode(torch.from_numpy(x), saturate=saturate).numpy().astype(np.int64)
    assert mine.tolist() == e8m0_nearest_codes(x, saturate).tolist()


def test_e8m0_edges_match_ml_dtypes():
    x = e8m0_edge_inputs()
    mine = formats.get("e8m0").encode(torch.from_numpy(x), saturate=False).numpy().astype(np.int64)
    assert mine.tolist() == ref_codes(x, "e8m0").tolist()


@pytest.mark.parametrize("name,exp_bits,man_bits,special", [
    ("fp8_e4m3", 4, 3, "fn"), ("fp8_e5m2", 5, 2, "ieee"), ("fp6_e3m2", 3, 2, "none"),
    ("fp6_e2m3", 2, 3, "none"), ("fp4_e2m1", 2, 1, "none"), ("bf16", 8, 7, "ieee"), ("fp16", 5, 10, "ieee")])
def test_generic_constructor_reproduces_named_formats(name, exp_bits, man_bits, special):
    g = formats.float_format(exp_bits, man_bits, special=special)
    f = formats.get(name)
    assert g.max == f.max and g.smallest_subnormal == f.smallest_subnormal
    x = torch.randn(100_000) * f.max / 4
    assert torch.equal(g.encode(x), f.encode(x))


def test_float_format_descriptions_match_ml_dtypes_finfo():
    for name, dt in REFS.items():
        f, fi = formats.get(name), ml_dtypes.finfo(dt)
        assert f.max == float(fi.max), name
        assert f.smallest_normal == float(fi.smallest_normal), name
        assert f.smallest_subnormal == float(fi.smallest_subnormal), name
        if name != "e8m0":
            assert f.eps == float(fi.eps), name
    assert formats.get("fp8_e4m3").max == 448.0


def test_study_layout_with_custom_bias():
    f = formats.float_format(3, 4, bias=2)
    v = f.values
    assert f.bits == 8 and float(v.max()) == f.max == (1 + 15 / 16) * 2.0**(6 - 2)  # exponent 7 is Inf/NaN
    assert f.smallest_subnormal == 2.0**(1 - 2 - 4)


def test_rejects_bad_inputs():
    f = formats.get("fp8_e4m3")
    with pytest.raises(ValueError, match="floating-point"):
        f.encode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer tensor"):
        f.decode(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="unknown format 'fp9'"):
        formats.get("fp9")
    with pytest.raises(ValueError, match="special"):
        formats.float_format(3, 2, special="weird")
