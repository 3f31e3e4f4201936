"""Equivalence transforms (AWQ, SmoothQuant): scales, folding, composition with solvers."""
import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.methods import parse_method, smoothquant_scales
from lowbit.pipeline import RECIPES
from lowbit.pipeline.blocks import BlockInput, capture_inputs
from lowbit.pipeline.mappings import smoothing_groups
from lowbit.pipeline.stats import InputStats, StatsCollector
from lowbit.pipeline.transforms import fold_scales


@pytest.fixture(scope="module")
def calib(smollm2_2layers):
    from lowbit.eval import token_ids
    from conftest import wikitext_excerpt

    _, tok = smollm2_2layers
    ids = token_ids(tok, wikitext_excerpt("valid"))[:4 * 256]
    return [ids[i * 256:(i + 1) * 256][None] for i in range(4)]


def block_stats(model, calib, i=0):
    block = model.model.layers[i]
    names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    inputs = capture_inputs(model, model.model.layers[0], calib)
    for j in range(i):
        inputs = [BlockInput(model.model.layers[j](x.hidden, **x.kwargs), x.kwargs) for x in inputs]
    with StatsCollector(block, names, hessian=True) as c, torch.no_grad():
        for b, x in enumerate(inputs):
            c.batch = b
            block(x.hidden, **x.kwargs)
    return block, names, c, inputs


def test_groups_found_by_tracing_on_llama(smollm2_2layers, calib):
    model, _ = smollm2_2layers
    block, names, c, _ = block_stats(copy.deepcopy(model), calib)
    groups = {(g.producer, g.consumers) for g in smoothing_groups(block, names, c.producers)}
    assert groups == {
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
        # v_proj -> o_proj is skipped: grouped-query attention makes v_proj narrower (192 < 576)
    }


@pytest.mark.parametrize("kind", ["smoothquant", "awq"])
@pytest.mark.parametrize("layer", [0, 1])
def test_folding_leaves_the_full_precision_model_unchanged(smollm2_2layers, calib, kind, layer):
    model, _ = smollm2_2layers
    m = copy.deepcopy(model)
    ids = calib[0][:, :128]
    with torch.no_grad():
        ref = m(ids).logits
    block, names, c, inputs = block_stats(m, calib, layer)
    before = {n: block.get_submodule(n).weight.detach().clone() for n in names}
    scheme = RECIPES["w4g64"].weights
    fold_scales(block, names, {n: (kind,) for n in names}, {n: scheme for n in names}, c.stats, c.producers,
                inputs[0], "block")
    changed = [n for n in names if not torch.equal(before[n], block.get_submodule(n).weight)]
    assert len(changed) >= 5  # the transform did something
    with torch.no_grad():
        out = m(ids).logits
    assert (out - ref).norm() / ref.norm() < 1e-4


def test_smoothquant_scales_follow_the_formula(gen):
    ws = [torch.randn(16, 32, generator=gen), torch.randn(8, 32, generator=gen) * 3]
    st = InputStats(32, hessian=False)
    x = torch.randn(100, 32, generator=gen) * torch.linspace(0.1, 30, 32)
    st.update(x, 0)
    for alpha in (0.0, 0.5, 0.85):
        s = smoothquant_scales(ws, st, alpha=alpha).double()
        wmax = torch.cat(ws).abs().amax(0).double()
        want = x.abs().amax(0).double() ** alpha / wmax ** (1 - alpha)
        torch.testing.assert_close(s, want, rtol=1e-5, atol=0)
        # after smoothing, activation and weight ranges per channel meet at max|X|^a * max|W|^(1-a)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(ws, st, alpha=1.5)


def test_method_chains():
    assert parse_method("awq+gptq") == (("awq",), "gptq")
    assert parse_method("smoothquant") == (("smoothquant",), "rtn")
    assert parse_method("hqq") == ((), "hqq")
    for bad in ("gptq+awq", "awq+awq", "rtn+gptq", "awq+nope"):
        with pytest.raises(ValueError):
            parse_method(bad)


@pytest.mark.parametrize("recipe,method", [("w4g64", "awq"), ("w4g64", "awq+gptq"),
                                           ("w8a8-dynamic", "smoothquant"), ("w8a8-dynamic", "smoothquant+gptq"),
                                           ("w8a8-static", "smoothquant")])
def test_chains_on_truncated_smollm2(smollm2_2layers, calib, recipe, method):
    model, _ = smollm2_2layers
    q = lowbit.quantize(copy.deepcopy(model), recipe, calibration=calib, method=method, progress=False)
    ids = calib[1][:, :96]
    with torch.no_grad():
        ref, out = model(ids).logits, q(ids).logits
    agree = (ref.argmax(-1) == out.argmax(-1)).float().mean()
    assert agree > (0.9 if recipe.startswith("w8") else 0.7), agree
    if recipe == "w8a8-static":  # ranges observed after smoothing, on the quantized model
        assert all(m.act_scale is not None for m in q.modules() if hasattr(m, "act_scale"))


def test_auto_picks_a_chain_per_kind():
    from lowbit.pipeline import get_recipe

    assert get_recipe("w4g64", "auto").method == "awq+gptq"
    assert get_recipe("w3g64", "auto").method == "awq+gptq"
    assert get_recipe("nf4", "auto").method == "awq+gptq"
    assert get_recipe("w8", "auto").method == "rtn"
    assert get_recipe("w8a8-dynamic", "auto").method == "smoothquant"


class OffsetNorm(nn.Module):
    """Gemma-style RMSNorm: multiplies by (1 + weight), so dividing weight by s is not a fold."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc = OffsetNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


def test_a_norm_that_cannot_absorb_scales_is_refused():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(16), Block(16)])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    net = Net()
    calib = [torch.randn(4, 8, 16) * torch.linspace(0.1, 20, 16) for _ in range(2)]
    with pytest.raises(ValueError, match="changed its output"):
        lowbit.quantize(net, "w8", method="smoothquant", calibration=calib, progress=False)


def test_a_folds_check_runs_the_block_on_the_first_window_with_its_own_mask(smollm2_2layers, calib):
    """first_windows cuts the batch and every argument with a batch dimension (here a padding mask that
    differs per window); the block's output on the cut input is the full batch's first window's."""
    from lowbit.pipeline.blocks import first_windows, run_block

    model, _ = smollm2_2layers
    ids = torch.cat([c[:, :64] for c in calib[:3]])
    mask = torch.ones_like(ids)
    mask[1:, :20] = 0  # windows 2 and 3 padded on the left: a mask [3, 1, 64, 64] that is not shared
    batch = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    inp = capture_inputs(model, model.model.layers[0], [batch])[0]
    cut = first_windows(inp, 1)
    assert cut.hidden.shape[0] == 1
    full = run_block(model.model.layers[0], inp)
    torch.testing.assert_close(run_block(model.model.layers[0], cut), full[:1], rtol=1e-5, atol=1e-5)
    assert first_windows(cut, 1) is cut


def test_a_norm_that_cannot_absorb_scales_is_refused_on_the_token_probe(gen):
    """Token batches: the fold is checked on block i's input for the first 64 tokens of the first window
    (captured once, carried through the quantized blocks), which shows the offset norm as well."""
    from conftest import tiny_transformer
    from lowbit.pipeline.blocks import short_batch

    model = tiny_transformer("qwen2", 2)
    model.model.layers[1].post_attention_layernorm = OffsetNorm(64)
    batches = [torch.randint(0, 100, (4, 80), generator=gen) for _ in range(2)]
    assert short_batch(batches[0]).shape == (1, 64)
    with_mask = {"input_ids": batches[0], "attention_mask": torch.ones(4, 80)}
    assert short_batch(with_mask)["attention_mask"].shape == (1, 64)
    assert short_batch(torch.randn(4, 8, 16)) is None  # not token ids: the first window is the check
    with pytest.raises(ValueError, match=r"model\.layers\.1 changed its output"):
        lowbit.quantize(copy.deepcopy(model), "w4g64", method="awq", calibration=batches, progress=False)
    lowbit.quantize(tiny_transformer("qwen2", 2), "w4g64", method="awq", calibration=batches, progress=False)
