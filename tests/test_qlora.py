"""QLoRA: peft's LoRA over lowbit's nf4-dq QuantLinear (train, checkpointing, save/load, merge)."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import wikitext_excerpt
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import lowbit
from lowbit.core import quantize
from lowbit.core.qtensor import QTensor
from lowbit.nn import QuantLinear
from lowbit.nn.lora import QuantLoraLinear, register

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def nf4_model(smollm2_2layers):
    """The 2-layer SmolLM2 quantized with nf4-dq. Do not mutate: deepcopy first."""
    model, tok = smollm2_2layers
    return lowbit.quantize(copy.deepcopy(model), "nf4-dq", progress=False), tok


@pytest.fixture(scope="module")
def ids(smollm2_2layers):
    _, tok = smollm2_2layers
    return tok(wikitext_excerpt("valid")[:4000], return_tensors="pt").input_ids[:, :128].reshape(2, 64)


def _peft(model, **kw):
    torch.manual_seed(0)
    cfg = register(LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, **kw))
    return get_peft_model(copy.deepcopy(model), cfg)


def _train(pm, ids, steps=4, lr=2e-3):
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    pm.eval()
    return losses


def test_quantlinear_gives_input_gradients(gen):
    w = torch.randn(96, 128, generator=gen) * 0.05
    layer = QuantLinear(quantize(w, lowbit.core.SCHEMES["nf4-dq"]), torch.randn(96, generator=gen))
    x = torch.randn(3, 20, 128, generator=gen, requires_grad=True)  # 60 tokens: the kernels' prefill route
    c = torch.randn(3, 20, 96, generator=gen)
    y = layer(x)
    (y * c).sum().backward()
    w_hat = layer.qweight.dequantize().double()
    torch.testing.assert_close(x.grad.double(), c.double() @ w_hat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.detach().double(), F.linear(x.detach().double(), w_hat, layer.bias.double()),
                               rtol=1e-5, atol=1e-5)


def test_lora_trains_adapters_only_over_a_frozen_nf4_base(nf4_model, ids):
    model, _ = nf4_model
    pm = _peft(model)
    lora = [m for m in pm.modules() if isinstance(m, QuantLoraLinear)]
    assert len(lora) == 2 * len(TARGETS)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if n in trainable)
    codes = {id(m): m.get_base_layer().qweight.codes.clone() for m in lora}
    losses = _train(pm, ids, steps=5)
    assert losses[-1] < losses[0] - 0.1, losses
    for m in lora:  # the base stayed frozen, byte for byte
        assert torch.equal(m.get_base_layer().qweight.codes, codes[id(m)])
        assert m.lora_B["default"].weight.abs().sum() > 0


def _enable_checkpointing(pm) -> None:
    """transformers 5.2x's activation_checkpointing_enable (its gradient_checkpointing_enable warns
    there), or gradient_checkpointing_enable where that is all the installed version has."""
    enable = getattr(pm, "activation_checkpointing_enable", None) or pm.gradient_checkpointing_enable
    enable()


def test_gradient_checkpointing_gives_the_same_gradients(nf4_model, ids):
    model, _ = nf4_model
    grads = []
    for checkpointing in (False, True):
        pm = _peft(model)
        if checkpointing:
            _enable_checkpointing(pm)
            assert pm.base_model.model.model.gradient_checkpointing
        pm.train()
        pm(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[1].values())


def test_quantlinear_in_bf16_keeps_codes_and_runs_the_backward_in_bf16(gen):
    w = torch.randn(96, 128, generator=gen) * 0.05
    q = quantize(w, lowbit.core.SCHEMES["nf4-dq"])
    layer = QuantLinear(q, torch.randn(96, generator=gen)).to(torch.bfloat16)
    assert layer.dtype == torch.bfloat16 and layer.qweight is q  # a cast leaves the codes alone
    x = torch.randn(3, 20, 128, generator=gen).bfloat16().requires_grad_()
    c = torch.randn(3, 20, 96, generator=gen).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    (y * c).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    w_bf16 = q.dequantize(torch.bfloat16).double()  # the weight the bf16 backward multiplies by
    torch.testing.assert_close(x.grad.double(), c.double() @ w_bf16, rtol=2e-2, atol=2e-2)


def _dequantize_dtypes(monkeypatch, shapes):
    """Record the dtype of every dequantization of a weight of one of `shapes` (the nf4-dq scales are
    dequantized to float32 on the way: they are not weights)."""
    seen = []
    original = QTensor.dequantize

    def spy(self, dtype=torch.float32):
        if tuple(self.shape) in shapes:
            seen.append(dtype)
        return original(self, dtype)

    monkeypatch.setattr(QTensor, "dequantize", spy)
    return seen


def test_bf16_compute_with_gradient_checkpointing(nf4_model, ids, monkeypatch):
    """QLoRA as the issue asks: frozen nf4-dq base computing in bf16, fp32 adapters (peft's default
    autocast_adapter_dtype), gradient checkpointing. The backward dequantizes each weight to bf16,
    never to float32, and checkpointing recomputes the same gradients."""
    model, _ = nf4_model
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    layers = [m for m in bf16.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.dtype == torch.bfloat16 for m in layers)
    for a, b in zip(layers, [m for m in model.modules() if isinstance(m, QuantLinear)]):
        assert torch.equal(a.qweight.codes, b.qweight.codes)  # the cast kept the 4-bit codes
    shapes = {tuple(m.qweight.shape) for m in layers}
    grads = []
    for checkpointing in (False, True):
        pm = _peft(bf16)
        assert all(p.dtype == torch.float32 for p in pm.parameters() if p.requires_grad)
        if checkpointing:
            _enable_checkpointing(pm)
            assert pm.base_model.model.model.gradient_checkpointing
        pm.train()
        seen = _dequantize_dtypes(monkeypatch, shapes)
        out = pm(input_ids=ids, labels=ids)
        assert out.logits.dtype == torch.bfloat16
        seen.clear()  # the backward's own dequantizations (and, with checkpointing, the recomputed forward's)
        out.loss.backward()
        assert seen and set(seen) == {torch.bfloat16}, seen
        monkeypatch.undo()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-6)
    assert all(torch.isfinite(g).all() for g in grads[1].values()) and any(g.abs().sum() > 0 for g in grads[1].values())
    losses = _train(pm, ids, steps=5)  # the checkpointed bf16 model trains
    assert losses[-1] < losses[0] - 0.1, losses


def test_save_pretrained_and_load_onto_a_fresh_base(nf4_model, smollm2_2layers, ids, tmp_path):
    model, _ = nf4_model
    pm = _peft(model)
    _train(pm, ids, steps=2)
    pm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(TARGETS)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors  # peft's standard names
    assert len(tensors) == 2 * 2 * len(TARGETS)

    fresh = lowbit.quantize(copy.deepcopy(smollm2_2layers[0]), "nf4-dq", progress=False)  # quantized again
    loaded = PeftModel.from_pretrained(fresh, tmp_path, config=register(LoraConfig.from_pretrained(tmp_path)))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, pm(input_ids=ids).logits)


def _delta(layer: QuantLoraLinear) -> torch.Tensor:
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    return B @ A * layer.scaling["default"]


def test_merge_into_full_precision_and_requantized(nf4_model, ids):
    model, _ = nf4_model
    pm = _peft(model)
    _train(pm, ids, steps=2)
    with torch.no_grad():
        y = pm(input_ids=ids).logits
    expected = {n.removeprefix("base_model.model."): (m.get_base_layer().qweight.dequantize().double() + _delta(m))
                for n, m in pm.named_modules() if isinstance(m, QuantLoraLinear)}
    schemes = {n.removeprefix("base_model.model."): m.get_base_layer().qweight.scheme
               for n, m in pm.named_modules() if isinstance(m, QuantLoraLinear)}

    merged = lowbit.qat.merge_lora(copy.deepcopy(pm))
    for n, w in expected.items():
        layer = merged.get_submodule(n)
        assert type(layer) is torch.nn.Linear
        torch.testing.assert_close(layer.weight.double(), w, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, y, rtol=1e-4, atol=1e-4)

    requantized = lowbit.qat.merge_lora(copy.deepcopy(pm), requantize="nf4-dq")
    peft_merged = copy.deepcopy(pm).merge_and_unload()  # peft's own: re-quantized on the base scheme
    for n, w in expected.items():
        ref = quantize(w.float(), schemes[n])
        for m in (requantized.get_submodule(n), peft_merged.get_submodule(n)):
            assert isinstance(m, QuantLinear)
            assert torch.equal(m.qweight.codes, ref.codes)
            assert torch.equal(m.qweight.dequantize(), ref.dequantize())


def test_register_refuses_what_it_cannot_run(nf4_model):
    model, _ = nf4_model
    with pytest.raises(ValueError, match="DoRA"):
        _peft(model, use_dora=True)
    with pytest.raises(ValueError, match="peft model"):
        lowbit.qat.merge_lora(copy.deepcopy(model))


def _qtensor_parts(q: QTensor) -> list[torch.Tensor]:
    """Every tensor a QTensor holds, nested scales (nf4-dq) included."""
    parts = [q.codes, q.zeros, q.tensor_scale, q.codebook, q.offset]
    parts += _qtensor_parts(q.scales) if isinstance(q.scales, QTensor) else [q.scales]
    return [t for t in parts if t is not None]


@pytest.mark.parametrize("scheme", ["nf4-dq", "mxfp4"])
def test_unmerge_restores_the_quantized_base_bit_for_bit(gen, scheme):
    """Re-quantizing W + BA - BA moves codes and scales; unmerge must give back the base as it was."""
    w = torch.randn(64, 128, generator=gen) * 0.05
    model = torch.nn.Sequential(QuantLinear(quantize(w, lowbit.core.SCHEMES[scheme]), torch.zeros(64)))
    pm = get_peft_model(model, register(LoraConfig(r=4, target_modules=["0"], lora_dropout=0.0)))
    layer = pm.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05, generator=gen)
    before = _qtensor_parts(layer.get_base_layer().qweight)
    x = torch.randn(5, 128, generator=gen)
    with torch.no_grad():
        y = pm(x)
        layer.merge()
        assert not all(torch.equal(a, b) for a, b in zip(before, _qtensor_parts(layer.get_base_layer().qweight)))
        layer.unmerge()
        assert all(torch.equal(a, b) for a, b in zip(before, _qtensor_parts(layer.get_base_layer().qweight)))
        assert torch.equal(pm(x), y)
