"""Quantizing a weight a block of rows at a time (pipeline/rowwise.py) gives the QTensor of quantizing
it whole, bit for bit; rows come from a safetensors file without loading the rest
(io/streaming/rows.py)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit.core import QTensor, Scheme
from lowbit.core.granularity import PerChannel, PerGroup, PerTensor
from lowbit.methods import METHODS
from lowbit.pipeline import get_recipe
from lowbit.pipeline.rowwise import by_rows, quantize_by_rows
from lowbit.io.streaming.rows import stored_tensors

SCHEMES = {
    "w4g64": get_recipe("w4g64").weights,  # uint4 affine, fp16 scales and zero points
    "w8": get_recipe("w8").weights,  # int8 per output channel
    "nf4": get_recipe("nf4").weights,
    "int3-g32-mse": Scheme("int3", PerGroup(32), range="mse"),
    "fp8-g32-e8m0": Scheme("fp8_e4m3", PerGroup(32), scale_format="e8m0"),
}


def same(a: QTensor, b: QTensor) -> None:
    assert a.shape == b.shape and a.scheme == b.scheme
    for x, y in [(a.codes, b.codes), (a.scales, b.scales), (a.zeros, b.zeros), (a.codebook, b.codebook)]:
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y))


@given(scheme=st.sampled_from(sorted(SCHEMES)), solver=st.sampled_from(["rtn", "mse"]),
       rows=st.integers(1, 40), groups=st.integers(1, 3), block_rows=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_row_blocks_join_to_the_whole_tensors_qtensor(scheme, solver, rows, groups, block_rows, seed):
    s = SCHEMES[scheme]
    w = torch.randn(rows, 64 * groups, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[0, 0] = 0.5  # an outlier: a row whose range differs from the others'
    reads = []

    def read(a, b):
        reads.append((a, b))
        return w[a:b].bfloat16().float() if scheme == "w8" else w[a:b]

    whole = METHODS[solver]((w.bfloat16().float() if scheme == "w8" else w), s)
    blocked = quantize_by_rows(read, tuple(w.shape), solver, s, block_bytes=block_rows * 4 * w.shape[1])
    same(blocked, whole)
    assert reads == [(a, min(a + block_rows, rows)) for a in range(0, rows, block_rows)]
    assert torch.equal(blocked.dequantize(), whole.dequantize())


@pytest.mark.parametrize("solver,scheme,why", [
    ("hqq", get_recipe("w4g64").weights, "hqq stops on a whole-tensor criterion"),
    ("gptq", get_recipe("w4g64").weights, "gptq is calibrated"),
    ("rtn", Scheme("int8", PerTensor()), "one scale for the whole tensor"),
    ("rtn", Scheme("int8", PerChannel(axis=1)), "statistics across rows"),
    ("rtn", get_recipe("nvfp4").weights, "a tensor-wide fp32 scale"),
    ("rtn", get_recipe("nf4-dq").weights, "scales quantized in blocks across rows"),
    ("rtn", Scheme("int4", PerGroup(64), rounding="stochastic"), "one random stream"),
])
def test_solvers_and_schemes_that_are_not_row_wise_are_refused(solver, scheme, why):
    assert not by_rows(solver, scheme, (128, 128)), why
    with pytest.raises(ValueError, match="not row-wise"):
        quantize_by_rows(lambda a, b: torch.zeros(b - a, 128), (128, 128), solver, scheme)


def test_cat_rows_refuses_tensor_wide_statistics():
    w = torch.randn(8, 64)
    q = METHODS["rtn"](w, Scheme("int8", PerTensor()))
    with pytest.raises(ValueError, match="tensor-wide"):
        QTensor.cat_rows([q, q])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stored_rows_equal_what_safetensors_reads(tmp_path, dtype):
    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(37, 24, generator=g).to(dtype), "b.weight": torch.randn(50, 16, generator=g).to(dtype),
               "c": torch.arange(7)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    stored = stored_tensors(tmp_path / "m.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in stored.items()} == {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        for name, (a, b) in [("a", (0, 37)), ("a", (5, 6)), ("b.weight", (13, 50)), ("c", (2, 5))]:
            assert torch.equal(stored[name].read_rows(a, b), f.get_slice(name)[a:b])


def test_a_truncated_file_is_named(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(f))
    stored = stored_tensors(f)["w"]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{f.name} is truncated: tensor 'w'"):
        stored_tensors(f)
    with pytest.raises(ValueError, match=rf"{f.name} is truncated: tensor 'w' rows 60:64"):
        stored.read_rows(60, 64)
    f.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match=rf"{f.name} is not a safetensors file"):
        stored_tensors(f)
