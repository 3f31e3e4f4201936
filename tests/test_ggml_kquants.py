"""K-quant blocks (Q2_K .. Q6_K) and IQ4_NL: byte-equal to llama.cpp's llama-quantize (no imatrix).

The golden files are llama-quantize's bytes (llama.cpp commit pinned in bench/llama_cpp.sh) for the first
16 rows of a SmolLM2-135M ffn_down weight, quantized from an F32 GGUF written by lowbit (Q2_K and Q3_K:
`llama-quantize --pure` on that file's ffn_down tensors, bench/kquant_golden.py, since no SmolLM2 mixture
writes Q2_K); bench/gguf_check.py redoes the comparison on every tensor of whole files. Decoding is
checked against gguf-py; the vectorized searches against scalar C-order loops (tests/reference).
"""
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypothesis import settings

from lowbit.core.ggml_blocks import GGML_TYPES, dequantize_rows, quantize_rows
from lowbit.core.ggml_kquants import make_q3_quants, make_qkx2_quants, nearest_int
from lowbit.io import builtin_model_path, read_gguf_tensors
from reference import ggml_kquants_ref as ref

GOLDEN = Path(__file__).parent / "golden"
# (type, tensor): from llama-quantize's --pure Q2_K and Q3_K_S, q4_k_m, q5_k_m, q6_k and iq4_nl files
CASES = [("q2_k", "blk.3.ffn_down"), ("q3_k", "blk.3.ffn_down"), ("q4_k", "blk.3.ffn_down"), ("q5_k", "blk.3.ffn_down"), ("q6_k", "blk.0.ffn_down"),
         ("iq4_nl", "blk.0.attn_q")]


@pytest.mark.parametrize("kind,tensor", CASES)
def test_bytes_equal_llama_quantize_on_smollm2(kind, tensor):
    name = f"{tensor}.weight"
    w = read_gguf_tensors(builtin_model_path("smollm2-135m"), [name])[name][:16].numpy()
    # rows as stored in GGUF (attn_q permuted): the F32 file llama-quantize read holds the same rows
    golden = np.fromfile(GOLDEN / f"{kind}_smollm2_{tensor.replace('.', '', 1).replace('.', '_')}_rows0-15.bin",
                         dtype=np.uint8).reshape(16, -1)
    ours = quantize_rows(w, kind)
    assert ours.shape == golden.shape
    assert np.array_equal(ours, golden), f"{(ours != golden).any(axis=1).sum()} rows differ"


@pytest.mark.parametrize("kind", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl"])
def test_decoding_equals_gguf_py_and_error_is_small(kind):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((6, 512)) * rng.uniform(1e-3, 10, (6, 1))).astype(np.float32)
    w[0, :256] = 0  # an all-zero super-block
    w[1, :32] = 2.5  # a flat sub-block
    data = quantize_rows(w, kind)
    ours = dequantize_rows(data, kind, 512)
    ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind.upper()]).reshape(w.shape)
    assert np.array_equal(ours, ref)
    bits = {"q2_k": 2, "q3_k": 3, "q4_k": 4, "q5_k": 5, "q6_k": 6, "iq4_nl": 3.5}[kind]  # iq4_nl: non-uniform levels, widest gap 23/240
    rel = np.abs(ours - w).max(axis=1) / np.abs(w).max(axis=1).clip(1e-30)
    assert (rel[1:] < 2.0 ** (1 - bits)).all(), rel  # within a step or so of a 2**bits grid
    assert (ours[0, :256] == 0).all()


@given(st.lists(st.floats(-4, 4, width=32), min_size=32, max_size=32), st.sampled_from([(15, -1.0, 20), (31, -0.5, 15)]))
def test_make_qkx2_quants_equals_the_scalar_c_loop(values, params):
    x = np.array(values, dtype=np.float32)
    w = (np.sqrt(np.float32((x * x).sum() / 32)) + np.abs(x)).astype(np.float32)
    nmax, rmin, nstep = params
    scale, mn, L = make_qkx2_quants(x[None], w[None], nmax, rmin, np.float32(0.1), nstep)
    r_scale, r_min, r_L = ref.make_qkx2_quants(x, w, nmax, rmin, 0.1, nstep)
    assert (scale[0], mn[0], L[0].tolist()) == (r_scale, r_min, r_L)


@given(st.lists(st.floats(-4, 4, width=32), min_size=16, max_size=16))
def test_make_qkx2_quants_with_absolute_error_equals_the_scalar_c_loop(values):
    """Q2_K's call: 16 values, weights |x|, 4 levels, absolute error."""
    x = np.array(values, dtype=np.float32)
    scale, mn, L = make_qkx2_quants(x[None], np.abs(x)[None], 3, -0.5, np.float32(0.1), 15, use_mad=True)
    r_scale, r_min, r_L = ref.make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, use_mad=True)
    assert (scale[0], mn[0], L[0].tolist()) == (r_scale, r_min, r_L)


@given(st.lists(st.floats(-4, 4, width=32), min_size=16, max_size=16))
def test_make_q3_quants_equals_the_scalar_c_loop(values):
    x = np.array(values, dtype=np.float32)
    scale, L = make_q3_quants(x[None], 4)
    r_scale, r_L = ref.make_q3_quants(x, 4)
    assert (scale[0], L[0].tolist()) == (r_scale, r_L)


def test_make_q3_quants_runs_all_five_sweeps():
    """A sub-block (found among 200k Gaussian ones, about 1 in 12k) whose codes still change in the 5th sweep."""
    bits = [3196192303, 3209272063, 3214733219, 3218420438, 1059709577, 3213145813, 1059928470, 1058044852,
            1050872103, 3213587285, 1068948775, 1061765580, 1070548451, 1068165052, 1054756931, 1069049074]
    x = np.array(bits, dtype=np.uint32).view(np.float32)
    scale, L = make_q3_quants(x[None], 4)
    assert (scale[0], L[0].tolist()) == ref.make_q3_quants(x, 4)
    assert L[0].tolist() == [4, 2, 2, 1, 5, 2, 5, 5, 5, 2, 7, 6, 7, 7, 5, 7]


def _block(values, magnitude):
    return (np.array(values, dtype=np.float32) * np.float32(magnitude))[None]


@settings(max_examples=15)
@given(st.lists(st.floats(-4, 4, width=32), min_size=256, max_size=256), st.sampled_from([1e-3, 1, 300]),
       st.sampled_from(["q2_k", "q3_k"]))
def test_q2_k_q3_k_blocks_equal_the_scalar_c_loops(values, magnitude, kind):
    x = _block(values, magnitude)
    oracle = {"q2_k": ref.quantize_q2_k_block, "q3_k": ref.quantize_q3_k_block}[kind]
    assert quantize_rows(x, kind).tobytes() == oracle(x[0])


def test_q2_k_q3_k_scalar_loops_on_smollm2_rows():
    """The scalar loops on real weights, where the sweeps and ties are not hypothesis's corner cases."""
    name = "blk.3.ffn_down.weight"
    w = read_gguf_tensors(builtin_model_path("smollm2-135m"), [name])[name][:2, :512].numpy()
    for kind, oracle in (("q2_k", ref.quantize_q2_k_block), ("q3_k", ref.quantize_q3_k_block)):
        expect = b"".join(oracle(b) for b in w.reshape(-1, 256))
        assert quantize_rows(w, kind).tobytes() == expect, kind


def test_nearest_int_is_the_c_bit_trick():
    """Round half to even within 2**22; beyond, C's float trick wraps (no assert in release builds)."""
    v = np.array([0.5, 1.5, -2.5, 3.4999998, -4194303.0, 1e10, np.inf], dtype=np.float32)
    assert nearest_int(v).tolist() == [ref.nearest_int(a) for a in v]
    assert nearest_int(v[:5]).tolist() == [0, 2, -2, 3, -4194303]


@pytest.mark.parametrize("kind", [t.name for t in GGML_TYPES.values() if t.fit is not None])
def test_fit_values_are_the_dequantized_packed_codes(kind):
    """scale * levels[codes] + offset is what the packed codes decode to, for the round-to-nearest codes
    and for any other codes on the grid (a solver's)."""
    t = GGML_TYPES[kind]
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((8, t.block_size)) * rng.uniform(1e-3, 10, (8, 1))).astype(np.float32)
    x[0] = 0
    fit = t.fit(x)
    for codes in (fit.codes, rng.integers(0, len(fit.levels), fit.codes.shape).astype(np.uint8)):
        sub = np.arange(t.block_size) // fit.sub
        values = fit.scale[:, sub] * fit.levels[codes] + fit.offset[:, sub]
        assert np.array_equal(values, t.dequantize(fit.pack(codes)))
    assert np.array_equal(fit.pack(fit.codes), t.quantize(x))
