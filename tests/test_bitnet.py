"""Binary / ternary recipes and BitNet b1.58's BitLinear, against float64 definitions."""
import copy

import pytest
import torch

import lowbit
from lowbit.core import unpack_bits_le, pack_bits_le
from lowbit.methods.bitnet import BITNET_WEIGHTS, ternary_values
from lowbit.nn import BitLinear, QuantLinear
from lowbit.pipeline.recipe import RECIPES


def _bitnet_reference(x, w, b):
    """BitNet b1.58 in float64: absmean ternary W, absmax int8 x per token, one rescale."""
    x, w, b = x.double(), w.double(), b.double()
    gamma = w.abs().mean()
    wt = (w / gamma).round().clamp(-1, 1)
    s = x.abs().amax(-1, keepdim=True) / 127
    xq = (x / s).round().clamp(-127, 127)
    return (xq @ wt.T) * s * gamma + b, wt


def test_bitlinear_forward_matches_its_definition(gen):
    linear = torch.nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=gen) * 0.05)
    x = torch.randn(3, 7, 96, generator=gen)
    layer = BitLinear.from_linear(linear, lowbit.quantize_tensor(linear.weight.detach(), BITNET_WEIGHTS))
    y_ref, wt = _bitnet_reference(x, linear.weight.detach(), linear.bias.detach())
    assert torch.equal(ternary_values(layer.qweight).double(), wt)
    y = layer(x)
    assert torch.allclose(y.double(), y_ref, rtol=0, atol=1e-5 * y_ref.abs().max().item())
    # really quantized: far from the float layer, which a no-op BitLinear would equal
    assert (y - linear(x)).abs().max() > 0.05 * linear(x).abs().max()


def test_ternary_codes_pack_two_bits_each_exactly():
    w = torch.tensor([[2.0, -2.0, 0.1, -0.1, 2.0, 2.0, -2.0, 0.0]])  # gamma = 1.0625
    q = lowbit.quantize_tensor(w, BITNET_WEIGHTS)
    # ternary [1, -1, 0, 0 | 1, 1, -1, 0] -> codebook indices [2, 0, 1, 1 | 2, 2, 0, 1], LSB first
    assert q.codes.tolist() == [0b01010010, 0b01001010]
    assert q.nbytes == 2 + 4  # 2 bits per weight plus one fp32 gamma
    big = lowbit.quantize_tensor(torch.randn(64, 200), BITNET_WEIGHTS)
    assert big.codes.numel() == 64 * 200 // 4
    assert torch.equal(pack_bits_le(unpack_bits_le(big.codes, 2, 64 * 200), 2), big.codes)


@pytest.mark.parametrize("recipe", ["binary", "ternary"])
def test_binary_and_ternary_recipes_match_xnor_and_absmean(gen, recipe):
    w = torch.randn(24, 80, generator=gen)
    q = lowbit.quantize_tensor(w, RECIPES[recipe].weights)
    alpha = w.double().abs().mean(1, keepdim=True)  # per output channel
    ref = w.double().sign() * alpha if recipe == "binary" else (w.double() / alpha).round().clamp(-1, 1) * alpha
    assert torch.allclose(q.dequantize().double(), ref, atol=1e-6)
    bits = 1 if recipe == "binary" else 2
    assert q.nbytes == 24 * 80 * bits // 8 + 24 * 4


def test_quantize_bitnet_builds_bitlinear(smollm2_2layers):
    model = copy.deepcopy(smollm2_2layers[0])
    lowbit.quantize(model, "bitnet", progress=False)
    layers = [m for m in model.model.layers.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(isinstance(m, BitLinear) for m in layers)
    assert layers[0].qweight.bits_per_weight < 2.01
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
