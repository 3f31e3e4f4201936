"""K-quant blocks (Q4_K, Q5_K, Q6_K) and IQ4_NL: byte-equal to llama.cpp's llama-quantize (no imatrix).

The golden files are llama-quantize's bytes (llama.cpp commit pinned in bench/llama_cpp.sh) for the first
16 rows of a SmolLM2-135M ffn_down weight, quantized from an F32 GGUF written by lowbit; bench/gguf_check.py
redoes the comparison on every tensor of whole files. Decoding is checked against gguf-py.
"""
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit.core.ggml_blocks import dequantize_rows, quantize_rows
from lowbit.core.ggml_kquants import make_qkx2_quants
from lowbit.io import builtin_model_path, read_gguf_tensors
from reference.ggml_kquants_ref import make_qkx2_quants as make_qkx2_quants_ref

GOLDEN = Path(__file__).parent / "golden"
# (type, tensor): from llama-quantize's q4_k_m, q5_k_m, q6_k and iq4_nl files
CASES = [("q4_k", "blk.3.ffn_down"), ("q5_k", "blk.3.ffn_down"), ("q6_k", "blk.0.ffn_down"),
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


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k", "iq4_nl"])
def test_decoding_equals_gguf_py_and_error_is_small(kind):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((6, 512)) * rng.uniform(1e-3, 10, (6, 1))).astype(np.float32)
    w[0, :256] = 0  # an all-zero super-block
    w[1, :32] = 2.5  # a flat sub-block
    data = quantize_rows(w, kind)
    ours = dequantize_rows(data, kind, 512)
    ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind.upper()]).reshape(w.shape)
    assert np.array_equal(ours, ref)
    bits = {"q4_k": 4, "q5_k": 5, "q6_k": 6, "iq4_nl": 3.5}[kind]  # iq4_nl: non-uniform levels, widest gap 23/240
    rel = np.abs(ours - w).max(axis=1) / np.abs(w).max(axis=1).clip(1e-30)
    assert (rel[1:] < 2.0 ** (1 - bits)).all(), rel  # within a step or so of a 2**bits grid
    assert (ours[0, :256] == 0).all()


@given(st.lists(st.floats(-4, 4, width=32), min_size=32, max_size=32), st.sampled_from([(15, -1.0, 20), (31, -0.5, 15)]))
def test_make_qkx2_quants_equals_the_scalar_c_loop(values, params):
    x = np.array(values, dtype=np.float32)
    w = (np.sqrt(np.float32((x * x).sum() / 32)) + np.abs(x)).astype(np.float32)
    nmax, rmin, nstep = params
    scale, mn, L = make_qkx2_quants(x[None], w[None], nmax, rmin, np.float32(0.1), nstep)
    r_scale, r_min, r_L = make_qkx2_quants_ref(x, w, nmax, rmin, 0.1, nstep)
    assert (scale[0], mn[0], L[0].tolist()) == (r_scale, r_min, r_L)
