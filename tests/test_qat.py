"""Quantization-aware training: FakeQuantLinear's gradients, LSQ, prepare/convert on SmolLM2."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.core import PerGroup, PerTensor, Scheme, quantize
from lowbit.nn import QuantLinear
from lowbit.nn.fake_quant import FakeQuantLinear
from lowbit.pipeline.recipe import get_recipe

from conftest import wikitext_excerpt

W3G64 = get_recipe("w3g64").weights  # uint3 affine, groups of 64, fp16 scales and zero points


def _linear(gen, out=48, inp=128):
    lin = torch.nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(out, generator=gen) * 0.1)
    return lin


@pytest.mark.parametrize("scales", ["dynamic", "frozen"])
@pytest.mark.parametrize("scheme", [W3G64, Scheme("nf4", PerGroup(32)), get_recipe("nf4-dq").weights,
                                    get_recipe("mxfp4").weights])
def test_ste_gradient_is_the_gradient_at_the_quantized_weight(gen, scheme, scales):
    """STE: dL/dW = dL/dQ(W), with Q(W) = quantize(W).dequantize() computed independently, and the
    forward equals F.linear with Q(W)."""
    lin = _linear(gen)
    f = FakeQuantLinear.from_linear(lin, scheme, scales=scales)
    x = torch.randn(3, 7, 128, generator=gen, requires_grad=True)
    c = torch.randn(3, 7, 48, generator=gen)
    (f(x) * c).sum().backward()

    w_hat = quantize(lin.weight.detach(), scheme).dequantize().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w_hat, lin.bias.detach())
    (y_ref * c).sum().backward()
    assert torch.equal(f(x).detach(), y_ref.detach())
    assert torch.equal(f.weight.grad, w_hat.grad)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-6, atol=1e-7)
    assert not torch.equal(w_hat.detach(), lin.weight.detach())  # the forward did quantize


def test_activation_fake_quant_gradient_is_straight_through(gen):
    lin = _linear(gen)
    f = FakeQuantLinear.from_linear(lin, W3G64, act_scheme=Scheme("int8", lowbit.core.PerToken()))
    x = torch.randn(5, 128, generator=gen, requires_grad=True)
    c = torch.randn(5, 48, generator=gen)
    (f(x) * c).sum().backward()
    w_hat = quantize(lin.weight.detach(), W3G64).dequantize()
    assert torch.allclose(x.grad, c @ w_hat, rtol=1e-5, atol=1e-6)  # dL/dx = dL/dy W, x's rounding skipped
    # and the input was rounded: int8 per token
    amax = x.detach().abs().amax(-1, keepdim=True) / 127
    x_q = torch.round(x.detach() / amax).clamp(-127, 127) * amax
    assert torch.allclose(f(x).detach(), F.linear(x_q, w_hat, lin.bias.detach()), rtol=1e-5, atol=1e-6)


def _lsq_reference(w, s, z, qmin, qmax, grad_out, n_per_step):
    """LSQ (Esser et al. 2020, eqs. 1-3 and 4's gradient scale), float64, written from the paper; with a
    zero point z (affine) the grid value is q - z (LSQ+). w: [R, C], s and z: [R, G] per group of C // G."""
    w, grad_out = w.double(), grad_out.double()
    G = s.shape[1]
    s_full = s.double().repeat_interleave(w.shape[1] // G, dim=1)
    z_full = torch.zeros_like(s_full) if z is None else z.double().repeat_interleave(w.shape[1] // G, dim=1)
    v = w / s_full + z_full
    q = torch.round(torch.clamp(v, qmin, qmax)) - z_full
    w_hat = q * s_full
    inside = (v > qmin) & (v < qmax)
    dq_ds = torch.where(inside, -w / s_full + torch.round(v) - z_full, q)
    g = 1.0 / math.sqrt(n_per_step * qmax)
    grad_s = (grad_out * dq_ds).reshape(w.shape[0], G, -1).sum(-1) * g
    return w_hat, grad_out * inside, grad_s


@pytest.mark.parametrize("scheme", [Scheme("int4", PerTensor()), Scheme("int4", PerGroup(32)), W3G64])
def test_lsq_gradients_match_the_paper(gen, scheme):
    w = torch.randn(16, 128, generator=gen, dtype=torch.float64) * 0.05
    f = FakeQuantLinear(w.float(), None, scheme, scales="learned")
    with torch.no_grad():  # shrink the steps so that some weights clip
        f.step.mul_(0.5)
        f.weight.copy_(w.float())
    grad_out = torch.randn(16, 128, generator=gen, dtype=torch.float64)
    w_hat = f.quantized_weight()
    (w_hat.double() * grad_out).sum().backward()

    s = f.step.detach()
    s_read = s.half().float() if scheme.scale_format == "fp16" else s
    per_tensor = s.numel() == 1
    s2 = s_read.reshape(1, 1).expand(16, 1) if per_tensor else s_read.reshape(16, -1)
    z = f.params.zero_values()
    n_per_step = 16 * 128 if per_tensor else 128 // s2.shape[1]
    ref_w_hat, ref_gw, ref_gs = _lsq_reference(f.weight.detach(), s2, None if z is None else z.reshape(16, -1),
                                               scheme.fmt.min, scheme.fmt.max, grad_out, n_per_step)
    if per_tensor:  # one step for the whole tensor: its gradient sums every row's
        ref_gs = ref_gs.sum().reshape(1, 1)
    assert 0.005 < (ref_gw == 0).double().mean() < 0.6  # some weights clipped, most inside
    assert torch.allclose(w_hat.double(), ref_w_hat, rtol=1e-6, atol=1e-9)
    assert torch.allclose(f.weight.grad.double(), ref_gw)
    assert torch.allclose(f.step.grad.double().reshape(ref_gs.shape), ref_gs, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("scales", ["dynamic", "frozen", "learned"])
@pytest.mark.parametrize("recipe", ["w3g64", "w4g64", "nf4-dq", "mxfp4", "w8a8-dynamic", "fp8-dynamic"])
def test_convert_gives_the_fake_quantized_outputs(gen, recipe, scales):
    r = get_recipe(recipe)
    if scales == "learned" and r.weights.double_quant is not None:
        with pytest.raises(ValueError, match="learned"):
            FakeQuantLinear.from_linear(_linear(gen), r.weights, scales=scales)
        return
    f = FakeQuantLinear.from_linear(_linear(gen), r.weights, act_scheme=r.activations, scales=scales)
    with torch.no_grad():  # move off the starting point, as training would
        f.weight.add_(torch.randn(f.weight.shape, generator=gen) * 0.01)
        if scales == "learned":
            f.step.mul_(1.1)
    q = f.to_quant()
    assert isinstance(q, QuantLinear)
    x = torch.randn(2, 9, 128, generator=gen)
    with torch.no_grad():
        y_fake, y_real = f(x), q(x)
    torch.testing.assert_close(y_real, y_fake, rtol=1e-5, atol=1e-5)  # kernels sum in another order
    assert torch.equal(q.qweight.dequantize(), f.quantized_weight().detach())


def _rtn_recipe(name):
    return get_recipe(name).replace(embeddings=None, output=None)


def test_prepare_convert_on_smollm2(smollm2_2layers):
    model, tok = smollm2_2layers
    ids = tok(wikitext_excerpt()[:600], return_tensors="pt").input_ids[:, :96]
    rtn = lowbit.quantize(copy.deepcopy(model), _rtn_recipe("w3g64"), progress=False)
    qat = lowbit.qat.prepare(copy.deepcopy(model), "w3g64", progress=False)
    assert sum(isinstance(m, FakeQuantLinear) for m in qat.modules()) == 14  # 2 blocks x 7 projections
    with torch.no_grad():
        y_rtn, y_fake = rtn(ids).logits, qat(ids).logits
        torch.testing.assert_close(y_fake, y_rtn, rtol=1e-4, atol=1e-4)  # dynamic scales: RTN's grid
        lowbit.qat.convert(qat, progress=False)
        assert not any(isinstance(m, FakeQuantLinear) for m in qat.modules())
        torch.testing.assert_close(qat(ids).logits, y_fake, rtol=1e-4, atol=1e-4)


def test_prepare_from_gptq_starts_on_its_codes(smollm2_2layers):
    model, tok = smollm2_2layers
    ids = tok(wikitext_excerpt("valid")[:4000], return_tensors="pt").input_ids[0, :512]
    gptq = lowbit.quantize(copy.deepcopy(model), _rtn_recipe("w3g64").replace(method="gptq"),
                           calibration=list(ids.reshape(4, 128)), progress=False)
    codes = {n: m.qweight.codes.clone() for n, m in gptq.named_modules() if isinstance(m, QuantLinear)}
    with torch.no_grad():
        y = gptq(ids[None, :64]).logits
    lowbit.qat.prepare(gptq, scales="frozen", progress=False)
    lowbit.qat.convert(gptq, progress=False)
    for n, m in gptq.named_modules():
        if n in codes:
            assert torch.equal(m.qweight.codes, codes[n]), n  # re-rounding GPTQ's weights gives its codes
    with torch.no_grad():
        torch.testing.assert_close(gptq(ids[None, :64]).logits, y, rtol=1e-5, atol=1e-5)


def test_qat_training_lowers_the_loss(smollm2_2layers):
    model, tok = smollm2_2layers
    ids = tok(wikitext_excerpt("valid")[:3000], return_tensors="pt").input_ids[:, :128]
    torch.manual_seed(0)
    student = lowbit.qat.prepare(copy.deepcopy(model), "w3g64", scales="learned", progress=False)
    params = [p for n, p in student.named_parameters() if n.endswith(("q_proj.weight", "k_proj.weight",
              "v_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight", ".step"))]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses = []
    for _ in range(6):
        loss = student(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_prepare_refuses_what_it_cannot_train(smollm2_2layers):
    model, _ = smollm2_2layers
    with pytest.raises(ValueError, match="round to nearest"):
        lowbit.qat.prepare(copy.deepcopy(model), get_recipe("w3g64").replace(method="gptq"))
    with pytest.raises(ValueError, match="observer"):
        lowbit.qat.prepare(copy.deepcopy(model), "w8a8-static")
    with pytest.raises(ValueError, match="no QuantLinear"):
        lowbit.qat.prepare(copy.deepcopy(model))
    with pytest.raises(ValueError, match="scales="):
        FakeQuantLinear(torch.zeros(4, 64), None, W3G64, scales="lsq")
    with pytest.raises(ValueError, match="prepare"):
        lowbit.qat.convert(copy.deepcopy(model))


@pytest.mark.parametrize("scheme", [W3G64, get_recipe("w4g64").weights, get_recipe("nf4-dq").weights,
                                    get_recipe("nvfp4").weights, Scheme("int4", PerTensor())])
def test_quantize_with_fitted_params_is_quantize(gen, scheme):
    from lowbit.core import fit_params, quantize_with

    w = torch.randn(32, 128, generator=gen)
    q, p = quantize(w, scheme), quantize_with(w, fit_params(w, scheme))
    assert torch.equal(p.codes, q.codes) and torch.equal(p.dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="shape"):
        quantize_with(w[:, :64], fit_params(w, scheme))
