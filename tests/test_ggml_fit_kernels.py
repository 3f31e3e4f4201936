"""The compiled GGML block quantizers (lowbit.kernels.ggml) against the numpy reference
(core.ggml_kquants / ggml_blocks, itself pinned to llama-quantize's bytes by tests/test_ggml_kquants.py and to
gguf-py by tests/test_ggml_blocks.py): the same bytes, codes, scales and offsets, block for block, on values
that reach every branch of ggml's searches (all-zero and flat sub-blocks, the GROUP_MAX_EPS boundary,
overflow to inf inside the search, nearest_int's wrap)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import kernels
from lowbit.core.ggml_blocks import GGML_TYPES
from lowbit.core.ggml_kquants import nearest_int
from lowbit.kernels import ggml

GRID_TYPES = [t.name for t in GGML_TYPES.values() if t.fit is not None]


def _hard_blocks(bs: int, rng) -> dict[str, np.ndarray]:
    """Named [n, bs] float32 cases, each several blocks."""
    def normal(n, scale=1.0):
        return (rng.standard_normal((n, bs)) * scale).astype(np.float32)

    outliers = normal(16)
    outliers[np.arange(16), rng.integers(0, bs, 16)] *= 50
    zeros = np.zeros((4, bs), np.float32)
    zeros[1] = -0.0
    zeros[2, ::2] = -0.0
    half_zero = normal(4)
    half_zero[:, : bs // 2] = 0  # all-zero sub-blocks inside a live block
    one = np.zeros((4, bs), np.float32)
    one[np.arange(4), [0, 5, bs - 1, bs // 2]] = [3.0, -2.0, 1e-3, -7.5]
    flat_sub = normal(4)
    flat_sub[:, :32] = 2.5
    flat_sub[:, 32:48] = -1.25
    return {
        "normal": normal(32) * rng.uniform(1e-3, 10, (32, 1)).astype(np.float32),
        "student_t": rng.standard_t(2, (32, bs)).astype(np.float32),
        "outliers": outliers,
        "zeros": zeros,
        "half_zero": half_zero,
        "constant": np.stack([np.full(bs, v, np.float32) for v in (2.5, -0.75, 1e-20, 3e38)]),
        "flat_sub_blocks": flat_sub,
        "one_nonzero": one,
        "tiny": normal(8, 1e-30),
        "near_eps": normal(8, 1e-15),
        "huge": normal(8, 1e37),
        "max_float": np.clip(normal(8, 3e38), -3.4e38, 3.4e38).astype(np.float32),
        "positive": np.abs(normal(8)),
        "negative": -np.abs(normal(8)),
        "mixed_magnitudes": normal(16) * np.float32(10.0) ** rng.integers(-8, 8, (16, bs)).astype(np.float32),
        "integers": rng.integers(-40, 40, (8, bs)).astype(np.float32),  # exact grid points and ties
        "halves": (rng.integers(-40, 40, (8, bs)) + 0.5).astype(np.float32),
    }


def _kernel_and_reference(kind: str, x: np.ndarray):
    t = GGML_TYPES[kind]
    fast = kernels.ggml_fit(kind, x)
    assert fast is not None, f"{kind}: the kernel should apply to finite float32 blocks"
    return fast, t.reference_fit(x)


@pytest.mark.parametrize("kind", GRID_TYPES)
def test_kernel_bytes_equal_the_reference(kind):
    t = GGML_TYPES[kind]
    rng = np.random.default_rng(11)
    with np.errstate(all="ignore"):
        for case, x in _hard_blocks(t.block_size, rng).items():
            (blocks, codes, scale, offset), ref = _kernel_and_reference(kind, x)
            want = ref.pack(ref.codes)
            bad = np.nonzero((blocks != want).any(axis=1))[0]
            assert not len(bad), f"{kind} {case}: blocks {bad[:5].tolist()} differ"
            assert np.array_equal(codes, ref.codes), f"{kind} {case}: codes"
            assert scale.tobytes() == np.ascontiguousarray(ref.scale, np.float32).tobytes(), f"{kind} {case}: scale"
            assert offset.tobytes() == np.ascontiguousarray(ref.offset, np.float32).tobytes(), f"{kind} {case}: offset"
            assert np.array_equal(t.quantize(x), want)


@pytest.mark.parametrize("kind", GRID_TYPES)
def test_fit_through_the_kernel_is_the_reference_fit(kind):
    """GGMLType.fit (the kernel) gives the reference's BlockFit, and packs any codes on the grid as it does."""
    t = GGML_TYPES[kind]
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((24, t.block_size)) * rng.uniform(1e-3, 10, (24, 1))).astype(np.float32)
    x[0] = 0
    fit, ref = t.fit(x), t.reference_fit(x)
    assert np.array_equal(fit.levels, ref.levels) and fit.sub == ref.sub
    assert np.array_equal(fit.scale, ref.scale) and np.array_equal(fit.offset, ref.offset)
    for codes in (fit.codes, rng.integers(0, len(ref.levels), ref.codes.shape).astype(np.uint8)):
        assert np.array_equal(fit.pack(codes), ref.pack(codes))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(GRID_TYPES), st.integers(0, 2**32 - 1),
       st.sampled_from([1e-30, 1e-16, 1e-6, 1.0, 1e6, 1e30, 1e37]), st.sampled_from(["normal", "t", "uniform"]))
def test_kernel_equals_the_reference_on_any_blocks(kind, seed, magnitude, dist):
    bs = GGML_TYPES[kind].block_size
    rng = np.random.default_rng(seed)
    draw = {"normal": lambda: rng.standard_normal((3, bs)), "t": lambda: rng.standard_t(1.5, (3, bs)),
            "uniform": lambda: rng.uniform(-1, 1, (3, bs))}[dist]
    with np.errstate(all="ignore"):
        x = np.clip(draw() * magnitude, -3.4e38, 3.4e38).astype(np.float32)
        ref = GGML_TYPES[kind].reference_fit(x)
        assert np.array_equal(kernels.ggml_fit(kind, x)[0], ref.pack(ref.codes))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(GRID_TYPES), st.lists(st.floats(-1e4, 1e4, width=32), min_size=32, max_size=32))
def test_kernel_equals_the_reference_on_hypothesis_values(kind, values):
    """hypothesis's own corner cases (repeats, +-0, the bounds) tiled over a block."""
    bs = GGML_TYPES[kind].block_size
    x = np.resize(np.array(values, np.float32), bs)[None]
    ref = GGML_TYPES[kind].reference_fit(x)
    assert np.array_equal(kernels.ggml_fit(kind, x)[0], ref.pack(ref.codes))


def test_one_thread_and_many_give_the_same_bytes():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 256)).astype(np.float32)  # several CHUNKs, the last one short
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.ggml_fit("q4_k", x)[0]
        torch.set_num_threads(max(2, threads))
        many = kernels.ggml_fit("q4_k", x)[0]
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(one, many)


@pytest.mark.parametrize("kind", ["q4_k", "q4_0"])
def test_the_kernel_declines_non_finite_values_and_the_reference_runs(kind):
    bs = GGML_TYPES[kind].block_size
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((2, bs), np.float32)
        x[1, 3] = bad
        assert kernels.ggml_fit(kind, x) is None
        with np.errstate(all="ignore"):
            f = GGML_TYPES[kind].reference_fit(x)
            assert np.array_equal(GGML_TYPES[kind].quantize(x), f.pack(f.codes))


def test_nearest_int_is_the_c_bit_trick_with_its_wrap():
    v = np.array([0.5, 1.5, -2.5, 3.4999998, -4194303.0, 4194304.0, 5e6, -3e7, 1e10, -1e30, 3.4e38,
                  np.inf, -np.inf], np.float32)
    assert [ggml._nearest_int(a) for a in v] == nearest_int(v).tolist()


def test_fp16_conversions_are_ieee_round_to_nearest_even():
    rng = np.random.default_rng(0)
    patterns = np.concatenate([rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32),
                               np.array([0, 0x80000000, 0x33000000, 0x33000001, 0x387FE000, 0x477FE000, 0x477FF000,
                                         0x7F800000, 0xFF800000], np.uint32)])
    v = patterns.view(np.float32)
    v = v[~np.isnan(v)]
    with np.errstate(over="ignore"):
        want = v.astype(np.float16).view(np.uint16)
    assert [ggml._fp16_bits(a) for a in v] == want.tolist()
    halves = np.arange(2**16, dtype=np.uint16)
    values = halves.view(np.float16).astype(np.float32)
    keep = ~np.isnan(values)
    assert np.array_equal(np.array([ggml._fp16_value(int(h)) for h in halves[keep]], np.float32).view(np.uint32),
                          values[keep].view(np.uint32))
