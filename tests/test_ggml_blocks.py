"""GGML block types against gguf-py (llama.cpp's Python package), byte for byte.

gguf.quants mirrors ggml's reference quantizers (quantize_row_*_ref) and is an independent
implementation: equality of bytes on random and real weights means llama.cpp reads our blocks as its own.
"""
import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from hypothesis import given
from hypothesis import strategies as st

from lowbit.core.ggml_blocks import GGML_TYPES, dequantize_rows, quantize_rows, round_half_away

# every type gguf-py can quantize that lowbit writes
GGUF_PY_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def _ref_bytes(w: np.ndarray, name: str) -> np.ndarray:
    q = quantize(w, gguf.GGMLQuantizationType(GGML_TYPES[name].id))
    return np.ascontiguousarray(q).view(np.uint8).reshape(w.shape[0], -1)


def _hard_rows(rng) -> np.ndarray:
    """[24, 256]: magnitudes from 1e-6 to 1e4, an all-zero block, constant blocks, exact ties of the
    largest magnitude with both signs, values on the rounding boundaries of the 4/5/8-bit grids."""
    w = rng.standard_normal((24, 256)).astype(np.float32) * np.logspace(-6, 4, 24, dtype=np.float32)[:, None]
    w[0, :32] = 0
    w[1, :32] = 0.75
    w[2, :32] = -3.0
    w[3, :2] = (5.0, -5.0)  # |max| tie: the first one sets the sign of Q4_0/Q5_0's scale
    w[4, :32] = np.arange(-16, 16, dtype=np.float32) + 0.5  # halves: rounding direction shows
    w[5, :32] = rng.integers(-8, 8, 32).astype(np.float32)  # exactly on the Q4_0 grid
    w[6, 32:64] = np.float32(1e-30)  # subnormal-range scales flush through fp16
    return w


@pytest.mark.parametrize("name", GGUF_PY_TYPES)
def test_blocks_equal_gguf_py_on_random_rows(name):
    rng = np.random.default_rng(7)
    for w in (_hard_rows(rng), rng.uniform(-1, 1, (64, 512)).astype(np.float32)):
        ours = quantize_rows(w, name)
        assert np.array_equal(ours, _ref_bytes(w, name))
        ref_values = dequantize(_ref_bytes(w, name), gguf.GGMLQuantizationType(GGML_TYPES[name].id))
        assert np.array_equal(dequantize_rows(ours, name, w.shape[1]), ref_values.reshape(w.shape), equal_nan=True)


@pytest.mark.parametrize("name", GGUF_PY_TYPES)
def test_blocks_equal_gguf_py_on_smollm2(smollm2_weights, name):
    for key, t in smollm2_weights.items():
        w = t.numpy()
        assert np.array_equal(quantize_rows(w, name), _ref_bytes(w, name)), key


@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=32, max_size=32), st.sampled_from(GGUF_PY_TYPES))
def test_blocks_equal_gguf_py_on_any_block(values, name):
    # + 0.0 turns -0.0 into 0.0: on signed zeros gguf-py's numpy min/argmax and C's scans (which lowbit
    # follows, tests/test_ggml_fit_kernels.py) may keep different zeros, and the sign shows in d or m
    w = np.array([values], dtype=np.float32) + np.float32(0)
    assert np.array_equal(quantize_rows(w, name), _ref_bytes(w, name))


def test_type_table_matches_the_gguf_constants():
    for t in GGML_TYPES.values():
        qt = gguf.GGMLQuantizationType(t.id)
        assert qt.name.lower() == t.name
        assert gguf.GGML_QUANT_SIZES[qt] == (t.block_size, t.type_size)


def test_round_half_away_is_c_roundf():
    v = np.array([0.5, -0.5, 1.5, 2.5, -2.5, 0.49999997, -0.49999997, 126.5, 3.0], dtype=np.float32)
    assert round_half_away(v).tolist() == [1, -1, 2, 3, -3, 0, 0, 127, 3]


def test_quantize_rows_names_a_bad_row_length():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rows(np.zeros((2, 48), np.float32), "q4_0")
    with pytest.raises(ValueError, match="unknown GGML type 'q9_9'"):
        quantize_rows(np.zeros((2, 64), np.float32), "q9_9")
