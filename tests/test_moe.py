"""Mixture-of-experts models (transformers 5's fused experts): every expert quantized, calibrated
experts reported, nothing left in float without a word (pipeline/experts.py, nn/experts.py)."""
import pytest
import torch
import transformers
from torch import nn

import lowbit
from lowbit.nn import QuantLinear, RoutedExperts
from lowbit.pipeline.experts import coverage, is_fused_experts

CONFIGS = {
    "mixtral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=256, head_dim=16),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                      vocab_size=256, head_dim=16, decoder_sparse_step=1, mlp_only_layers=[]),
}


def tiny(model_type: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(model_type, **CONFIGS[model_type])
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def fused_modules(model):
    return [n for n, m in model.named_modules() if is_fused_experts(m)]


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_unfused_experts_give_the_fused_outputs(model_type):
    model = tiny(model_type)
    assert fused_modules(model), "transformers should build fused experts (3-D parameters) here"
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        from lowbit.pipeline.experts import unfuse_experts
        names = unfuse_experts(model)
        got = model(ids).logits
    assert len(names) == 2 and all(isinstance(model.get_submodule(n), RoutedExperts) for n in names)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type,recipe,method", [(t, "w4g32", "rtn") for t in sorted(CONFIGS)] + [
    ("mixtral", r, m) for r, m in [("nf4", "rtn"), ("mxfp4", "rtn"), ("fp8", "rtn"), ("w8a8-dynamic", "rtn"),
                                   ("w4g64", "hqq")]])
def test_data_free_recipe_quantizes_every_expert(model_type, recipe, method, capsys):
    model = tiny(model_type)
    float_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    lowbit.quantize(model, recipe, method=method)
    experts = {n: m for n, m in model.named_modules() if ".experts." in n and n.endswith(("_proj"))}
    assert experts and all(isinstance(m, QuantLinear) for m in experts.values())
    assert sum(m.qweight.shape[0] * m.qweight.shape[1] for m in experts.values()) == float_params
    cov = model.lowbit_coverage
    assert set(cov.float_weights) <= {n for n in cov.float_weights if "embed" in n or "lm_head" in n
                                      or n.endswith("gate.weight")}, cov.float_weights
    assert "quantized " in capsys.readouterr().out
    with torch.no_grad():
        got = model(ids).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.2, rel  # 4-bit: close, not equal


def test_calibrated_experts_report_their_tokens_and_none_is_float_or_nan():
    model = tiny("qwen3_moe")
    g = torch.Generator().manual_seed(3)
    calib = [torch.randint(0, 256, (1, 32), generator=g) for _ in range(4)]
    lowbit.quantize(model, "w4g32", method="gptq", calibration=calib, calibration_dtype="fp32", progress=False)
    report = model.lowbit_calibration
    tokens = report.expert_tokens()
    assert len(tokens) == 2 * 8 * 3  # 2 blocks x 8 experts x (gate, up, down)
    assert sum(tokens[f"model.layers.0.mlp.experts.{e}.down_proj"] for e in range(8)) == 4 * 32 * 2  # top-2
    fell = {r.name for r in report.layers if r.fallback}
    assert fell == {n for n, t in tokens.items() if t < 16}
    assert "experts: 48 layers" in report.summary()
    for n, m in model.named_modules():
        if ".experts." in n and n.endswith("_proj"):
            assert isinstance(m, QuantLinear) and torch.isfinite(m.qweight.dequantize()).all(), n


def test_round_trip_through_lowbit_format(tmp_path):
    model = tiny("mixtral")
    lowbit.quantize(model, "w4g32", method="rtn", progress=False)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    lowbit.save(model, tmp_path / "q")
    back = lowbit.load(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)


class Fused3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x):
        return x @ self.w.sum(0)


def test_a_weight_lowbit_cannot_quantize_is_an_error_naming_it():
    model = nn.Sequential(nn.Linear(8, 8), Fused3D())
    with pytest.raises(ValueError, match=r"module '1' \(Fused3D\) holds weights of shape \[\(4, 8, 8\)\]"):
        lowbit.quantize(model, "w4g32", method="rtn", progress=False)
    model[1] = nn.Linear(8, 8)
    lowbit.quantize(model, "w8", method="rtn", progress=False)
    assert coverage(model).share == 1.0


def test_experts_with_too_few_routed_tokens_are_rounded_to_nearest_and_said_so():
    model = tiny("mixtral")
    calib = [torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(5))]
    lowbit.quantize(model, "w4g32", method="gptq", calibration=calib, calibration_dtype="fp32", progress=False)
    report = model.lowbit_calibration
    experts = [r for r in report.layers if ".experts." in r.name]
    assert experts and all(r.fallback == "fewer than 16 calibration tokens routed" for r in experts)
    assert "48 rounded to nearest" in report.summary()
    attn = [r for r in report.layers if "self_attn" in r.name]
    assert attn and not any(r.fallback for r in attn)


@pytest.mark.parametrize("recipe", ["w8", "w4g64-sym"])
def test_compressed_tensors_export_of_experts_loads_in_transformers(tmp_path, recipe):
    """Experts saved one quantized Linear each, as published checkpoints name them; transformers 5
    decompresses and fuses them back into its 3-D experts, giving lowbit's outputs."""
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model("qwen3_moe", **{**CONFIGS["qwen3_moe"], "moe_intermediate_size": 128})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    lowbit.quantize(model, recipe, method="rtn", progress=False)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    lowbit.save(model, tmp_path / "ct", format="compressed-tensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        assert "model.layers.1.mlp.experts.7.down_proj.weight_packed" in set(f.keys())
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = model(ids).logits, back(ids).logits
    # float32 summation order only (measured 2.3e-5 for w4g64-sym): a swapped gate/up or expert
    # order moves logits by the quantization's own size, ~1e-1 here
    assert ((got - want).norm() / want.norm()).item() < 1e-4


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_checkpoint_quantizes_every_expert_as_in_memory(tmp_path, model_type, method):
    """A Hugging Face folder as transformers 5 saves it (per-expert names; Mixtral's legacy
    block_sparse_moe.experts.{e}.w1/w2/w3) streamed a block at a time: the same QTensors as
    lowbit.quantize in memory, and lowbit.load gives the same logits."""
    from lowbit.io.streaming import quantize_checkpoint

    model = tiny(model_type)
    model.save_pretrained(tmp_path / "src", max_shard_size="200KB")
    g = torch.Generator().manual_seed(3)
    calib = [torch.randint(0, 256, (1, 32), generator=g) for _ in range(4)] if method == "gptq" else None
    kw = dict(calibration=calib, calibration_dtype="fp32") if calib else {}
    out = quantize_checkpoint(tmp_path / "src", lowbit.pipeline.get_recipe("w4g32", method), tmp_path / "out",
                              progress=False, **kw)
    lowbit.quantize(model, "w4g32", method=method, progress=False, batch_size=8, **kw)
    back = lowbit.load(out)
    mine = {n: m.qweight for n, m in back.named_modules() if isinstance(m, QuantLinear)}
    want = {n: m.qweight for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(mine) == sorted(want) and any(".experts.7.down_proj" in n for n in mine)
    for n in want:
        torch.testing.assert_close(mine[n].dequantize(), want[n].dequantize(), rtol=0, atol=0, msg=n)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)


def test_memory_of_a_mixture_of_experts_folder_counts_the_experts_quantized(tmp_path):
    from lowbit.analysis import memory_table

    tiny("mixtral").save_pretrained(tmp_path / "src")
    rows = {r.recipe: r for r in memory_table(str(tmp_path / "src"), ["fp32", "w4g64"]).rows}
    experts = 2 * 8 * 3 * 64 * 96  # blocks x experts x projections x h x f
    assert rows["w4g64"].quantized_bytes > experts * 4 / 8  # every expert's codes at least
    assert rows["w4g64"].other_bytes < rows["fp32"].other_bytes / 10  # no expert left in float
