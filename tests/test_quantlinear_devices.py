"""QuantLinear under module.to / .half / .bfloat16 / .float: the QTensor stays as stored, the
compute dtype follows the cast, and a move off the CPU is a clear error (nn/linear.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit.core import QTensor
from lowbit.io.lowbit_format import load_lowbit, save_lowbit
from lowbit.nn import QuantLinear
from lowbit.pipeline import quantize

from test_pipeline import Toy


def qtensor_parts(q: QTensor) -> list[torch.Tensor]:
    parts = [q.codes, q.zeros, q.tensor_scale, q.codebook, q.offset]
    parts += qtensor_parts(q.scales) if isinstance(q.scales, QTensor) else [q.scales]
    return [t for t in parts if t is not None]


@pytest.fixture(params=["w4g64", "nf4-dq", "w8a8-dynamic"])
def quantized(request):
    torch.manual_seed(0)
    return quantize(Toy().eval(), request.param, calibration=[torch.randint(0, 50, (2, 8))], progress=False)


@pytest.mark.parametrize("cast, dtype", [(lambda m: m.half(), torch.float16),
                                         (lambda m: m.bfloat16(), torch.bfloat16),
                                         (lambda m: m.to(torch.float16), torch.float16),
                                         (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16)])
def test_a_cast_sets_the_compute_dtype_and_keeps_the_qtensor(quantized, cast, dtype):
    before = {n: [t.clone() for t in qtensor_parts(m.qweight)] for n, m in quantized.named_modules()
              if isinstance(m, QuantLinear)}
    cast(quantized)
    for name, m in quantized.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        after = qtensor_parts(m.qweight)
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(after, before[name])), name
        assert m.qweight.codes.dtype == torch.uint8
        assert m.dtype == dtype and m.weight.dtype == dtype
        assert m.bias is None or m.bias.dtype == dtype
    x = torch.randn(3, 64).to(dtype)
    fc1 = quantized.fc1
    y = fc1(x)
    assert y.dtype == dtype
    if fc1._int8 is None:  # weight-only (packed-code kernel or dequantize + matmul): the float64 product
        ref = F.linear(x.double(), fc1.qweight.dequantize(torch.float64), fc1.bias.double())
        torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)  # one rounding to fp16/bf16


def test_a_move_on_the_cpu_keeps_the_compute_dtype(quantized):
    quantized.bfloat16()
    quantized.to("cpu")
    quantized.to(torch.device("cpu"))
    assert quantized.fc1.dtype == torch.bfloat16
    quantized.float()
    assert quantized.fc1.dtype == torch.float32 and quantized.fc1.bias.dtype == torch.float32


def test_cast_then_save_and_reload_is_bit_identical(quantized, tmp_path):
    quantized.half()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        out = quantized(ids)
    save_lowbit(quantized, tmp_path / "q")
    back = load_lowbit(tmp_path / "q", model=Toy())
    assert back.fc1.dtype == torch.float16
    with torch.no_grad():
        assert torch.equal(back(ids), out)


@pytest.mark.parametrize("device", ["meta", torch.device("meta")])
def test_a_move_off_the_cpu_is_a_clear_error(quantized, device):
    model = copy.deepcopy(quantized)
    with pytest.raises(ValueError, match="(QuantLinear|QuantEmbedding) runs on the CPU only; cannot move it to meta"):
        model.to(device)
