"""GPTQ and the sequential calibration runner."""
import copy

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.core import PerGroup, Scheme, quantize
from lowbit.methods import gptq
from lowbit.nn import QuantLinear
from lowbit.pipeline import RECIPES
from lowbit.pipeline.blocks import find_blocks
from lowbit.pipeline.stats import InputStats, StatsCollector

from conftest import tiny_transformer

SCHEMES = ["w4g64", "w4g64-sym", "w3g64", "w4g128", "nf4", "nvfp4", "mxfp4", "w8", "fp8", "fp8-tensor"]


def correlated_inputs(n: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """Activations with correlated channels and a few outlier channels, like an LLM's."""
    mix = torch.randn(dim, dim, generator=g) * 0.2 + torch.eye(dim)
    x = torch.randn(n, dim, generator=g) @ mix
    x[:, torch.randperm(dim, generator=g)[:4]] *= 15
    return x


def stats_of(x: torch.Tensor) -> InputStats:
    s = InputStats(x.shape[1], hessian=True)
    s.update(x, 0)
    return s


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_layer_loss_in_the_same_storage(name, act_order, gen):
    scheme = RECIPES[name].weights
    x = correlated_inputs(2048, 192, gen)
    w = torch.randn(96, 192, generator=gen) * 0.05
    st_ = stats_of(x)
    q, r = gptq(w, scheme, stats=st_, act_order=act_order, fallback_to_rtn=False), quantize(w, scheme)
    assert q.nbytes == r.nbytes and q.scheme == scheme and q.shape == r.shape
    # the loss GPTQ minimises, measured directly on the activations
    loss_q = ((x @ (w - q.dequantize()).T) ** 2).sum()
    loss_r = ((x @ (w - r.dequantize()).T) ** 2).sum()
    assert loss_q < 0.7 * loss_r, (float(loss_q), float(loss_r))


@pytest.mark.parametrize("name", ["w4g64", "w4g64-sym", "w3g64", "nf4", "w8", "fp8"])
def test_huge_dampening_is_round_to_nearest(name, gen):
    scheme = RECIPES[name].weights
    x = correlated_inputs(512, 128, gen)
    w = torch.randn(64, 128, generator=gen)
    q, r = gptq(w, scheme, stats=stats_of(x), damp=1e12, act_order=False, fallback_to_rtn=False), quantize(w, scheme)
    assert torch.equal(q.codes, r.codes)
    assert torch.equal(q.dequantize(), r.dequantize())


def test_dead_inputs_and_bad_calls(gen):
    x = correlated_inputs(256, 64, gen)
    x[:, 5] = 0
    w = torch.randn(16, 64, generator=gen)
    q = gptq(w, RECIPES["w4g64"].weights, stats=stats_of(x), fallback_to_rtn=False)
    assert torch.isfinite(q.dequantize()).all()
    with pytest.raises(ValueError, match="Hessian"):
        gptq(w, RECIPES["w4g64"].weights, stats=None)
    with pytest.raises(ValueError, match="does not match"):
        gptq(w[:, :32], RECIPES["w4g64"].weights, stats=stats_of(x))
    with pytest.raises(ValueError, match="granularity"):
        gptq(w, Scheme("int4", PerGroup(16, axis=0)), stats=stats_of(x))


def test_input_stats_match_float64_math(gen):
    xs = [torch.randn(3, 10, 32, generator=gen) for _ in range(3)]
    s = InputStats(32, hessian=True)
    for i, x in enumerate(xs):
        s.update(x, i)
        s.update(x, i)  # a second layer on the same input in the same batch counts once
    flat = torch.cat([x.reshape(-1, 32) for x in xs]).double()
    torch.testing.assert_close(s.hessian.double(), 2 * flat.T @ flat / len(flat), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.absmax.double(), flat.abs().amax(0))
    torch.testing.assert_close(s.absmean.double(), flat.abs().mean(0), rtol=1e-6, atol=1e-6)
    scale = torch.rand(32, generator=gen) + 0.5
    s.scale_inputs(scale)
    scaled = flat / scale.double()
    torch.testing.assert_close(s.hessian.double(), 2 * scaled.T @ scaled / len(flat), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.absmax.double(), scaled.abs().amax(0), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def calib(smollm2_2layers):
    from lowbit.eval import token_ids
    from conftest import wikitext_excerpt

    _, tok = smollm2_2layers
    ids = token_ids(tok, wikitext_excerpt("valid"))[:8 * 256]
    return [ids[i * 256:(i + 1) * 256][None] for i in range(8)]


def test_layers_sharing_an_input_share_statistics(smollm2_2layers, calib):
    model, _ = smollm2_2layers
    block = model.model.layers[0]
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    seen = {}
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0]))
             for n in names]
    with StatsCollector(model, [f"model.layers.0.{n}" for n in names], hessian=True) as c, torch.no_grad():
        model(calib[0], use_cache=False)
    for h in hooks:
        h.remove()
    s = {n.split(".", 3)[-1]: v for n, v in c.stats.items()}
    assert s["self_attn.q_proj"] is s["self_attn.k_proj"] is s["self_attn.v_proj"]
    assert s["mlp.gate_proj"] is s["mlp.up_proj"]
    assert len({id(v) for v in s.values()}) == 4  # attn in, o_proj in, mlp in, down_proj in
    x = seen["mlp.down_proj"].reshape(-1, 1536).double()
    torch.testing.assert_close(s["mlp.down_proj"].hessian.double(), 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("propagate", ["quantized", "full"])
def test_gptq_on_truncated_smollm2_beats_rtn_on_every_layer(smollm2_2layers, calib, propagate):
    model, _ = smollm2_2layers
    q = lowbit.quantize(copy.deepcopy(model), "w4g64", calibration=calib, method="gptq", progress=False,
                        propagate=propagate)
    rep = q.lowbit_calibration
    assert len(rep.layers) == 14 and rep.tokens == 8 * 256
    for layer in rep.layers:
        assert layer.loss < 0.8 * layer.rtn_loss, layer
    assert rep.peak_rss_mb > 0 and rep.activations_mb > 0
    ids = calib[0][:, :64]
    with torch.no_grad():
        ref, out = model(ids).logits, q(ids).logits
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() > 0.6


def test_gptq_model_saves_and_loads_bit_identically(smollm2_2layers, calib, tmp_path):
    model, tok = smollm2_2layers
    q = lowbit.quantize(copy.deepcopy(model), "w4g64", calibration=calib[:2], method="gptq", progress=False)
    lowbit.save(q, tmp_path / "g", tokenizer=tok, source="smollm2-135m")
    back = lowbit.load(tmp_path / "g")
    ids = calib[0][:, :32]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)


def test_gptq_needs_calibration_and_blocks(smollm2_2layers):
    model, _ = smollm2_2layers
    with pytest.raises(ValueError, match="calibration"):
        lowbit.quantize(copy.deepcopy(model), "w4g64", method="gptq", progress=False)
    flat = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="repeated blocks"):
        lowbit.quantize(flat, "w8", method="gptq", calibration=[torch.randn(4, 8)], progress=False)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "bert"])
def test_sequential_runner_on_other_architectures(arch):
    model = tiny_transformer(arch, layers=3)
    prefix, blocks = find_blocks(model)
    assert len(blocks) == 3, prefix
    calib = [torch.randint(0, 100, (1, 32)) for _ in range(4)]
    x = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        ref = model(x)[0]
    q = lowbit.quantize(copy.deepcopy(model), "w8", method="gptq", calibration=calib, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) >= 12
    assert all(r.loss <= r.rtn_loss * 1.01 for r in q.lowbit_calibration.layers)
    with torch.no_grad():
        out = q(x)[0]
    assert ((out - ref).norm() / ref.norm()) < 0.02


@pytest.mark.parametrize("name", ["w4g64", "w4g64-sym", "w3g64", "w4g128", "w8"])
@pytest.mark.parametrize("static_groups", [False, True])
def test_numba_column_loop_equals_the_torch_loop(name, static_groups, gen):
    assert kernels._gptq_columns() is not None  # numba is a required dependency
    # ragged shapes (200 = 64 * 3 + 8) and a block size that does not divide them
    scheme = RECIPES[name].weights
    x = correlated_inputs(1024, 200, gen)
    w = torch.randn(72, 200, generator=gen) * 0.05
    st_ = stats_of(x)
    fast = gptq(w, scheme, stats=st_, block_size=48, static_groups=static_groups, fallback_to_rtn=False)
    ref = gptq(w, scheme, stats=st_, block_size=48, static_groups=static_groups, fallback_to_rtn=False, kernel=False)
    assert torch.equal(fast.codes, ref.codes)
    assert torch.equal(fast.dequantize(), ref.dequantize())


def test_bf16_calibration_keeps_gptq_close_to_float32(gen):
    model = tiny_transformer("qwen2", 2)
    batches = [torch.randint(0, model.config.vocab_size, (2, 32), generator=gen) for _ in range(4)]
    qs = {}
    for dtype in ("fp32", "bf16"):
        q = copy.deepcopy(model)
        lowbit.quantize(q, "w4g64", calibration=batches, method="gptq", progress=False, calibration_dtype=dtype)
        qs[dtype] = q
        assert q.lowbit_calibration.dtype == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=gen)
    with torch.no_grad():
        ref, a, b = (m(ids).logits for m in (model, qs["fp32"], qs["bf16"]))
    err32, err16 = (ref - a).pow(2).mean(), (ref - b).pow(2).mean()
    assert err16 < 1.5 * err32, (float(err16), float(err32))


def test_recipe_method_options_reach_gptq_and_smoothquant(gen):
    model = tiny_transformer("qwen2", 2)
    batches = [torch.randint(0, model.config.vocab_size, (2, 32), generator=gen) for _ in range(2)]
    rtn = lowbit.quantize(copy.deepcopy(model), "w4g64", progress=False)
    as_rtn = {"gptq": {"damp": 1e12, "act_order": False, "fallback_to_rtn": False}}
    q = lowbit.quantize(copy.deepcopy(model), RECIPES["w4g64"].replace(method="gptq", method_options=as_rtn),
                        calibration=batches, progress=False)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(q.get_submodule(name).qweight.dequantize(), rtn.get_submodule(name).qweight.dequantize())
    w = {}
    for alpha in (0.5, 0.9):
        r = RECIPES["w8a8-dynamic"].replace(method="smoothquant", method_options={"smoothquant": {"alpha": alpha}})
        w[alpha] = lowbit.quantize(copy.deepcopy(model), r, calibration=batches, progress=False) \
            .get_submodule("model.layers.0.self_attn.q_proj").qweight.dequantize()
    assert not torch.equal(w[0.5], w[0.9])


def _gptq_module():
    import sys
    return sys.modules["lowbit.methods.gptq"]  # lowbit.methods.gptq is the function


def test_inverse_hessian_factor_is_the_float64_cholesky_of_the_inverse_without_lapack_inverse(monkeypatch, gen):
    m = _gptq_module()

    def no_potri(*a, **k):
        raise AssertionError("torch.cholesky_inverse (LAPACK potri) is single-threaded and slow: not used")
    monkeypatch.setattr(torch, "cholesky_inverse", no_potri)
    x = correlated_inputs(300, 520, gen)  # fewer tokens than inputs: H is singular before the dampening
    x[:, 7] = 0
    H = stats_of(x).hessian
    dead = H.diagonal() == 0
    U = m._inverse_hessian_factor(H, dead, 0.01)
    Hd = H.double().clone()
    Hd[7, 7] = 1.0
    Hd += 0.01 * float(Hd.diagonal().mean()) * torch.eye(520, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    assert torch.equal(U, torch.triu(U))
    torch.testing.assert_close(U.double(), ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    L = torch.tril(torch.randn(600, 600, generator=gen, dtype=torch.float64)) + 30 * torch.eye(600, dtype=torch.float64)
    torch.testing.assert_close(m.lower_inverse(L, leaf=64), torch.linalg.inv(L), rtol=0, atol=1e-12)


def test_layers_sharing_an_input_factor_it_once_when_solved_at_once(monkeypatch, gen):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    m = _gptq_module()
    calls, real = [], m._inverse_hessian_factor

    def slow(*a):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # the other threads arrive while it runs
        return real(*a)
    monkeypatch.setattr(m, "_inverse_hessian_factor", slow)
    st_ = stats_of(correlated_inputs(512, 128, gen))
    ws = [torch.randn(32, 128, generator=gen) for _ in range(3)]  # q, k, v on one input
    with ThreadPoolExecutor(3) as pool:
        qs = list(pool.map(lambda w: gptq(w, RECIPES["w4g64"].weights, stats=st_), ws))
    assert len(calls) == 1
    alone = gptq(ws[1], RECIPES["w4g64"].weights, stats=stats_of(correlated_inputs(512, 128, torch.Generator())))
    assert qs[1].shape == alone.shape


def test_the_report_takes_gptq_fallback_losses_instead_of_measuring_them_again(monkeypatch, gen):
    import sys

    from lowbit.pipeline.sequential import layer_loss
    pq = sys.modules["lowbit.pipeline.quantize"]  # lowbit.pipeline.quantize is the function

    scheme = RECIPES["w4g64"].weights
    st_ = stats_of(correlated_inputs(512, 128, gen))
    w = torch.randn(48, 128, generator=gen) * 0.05
    q = gptq(w, scheme, stats=st_)
    rtn_calls = []
    monkeypatch.setattr(pq, "rtn_method", lambda *a, **k: rtn_calls.append(1) or quantize(*a, **k))
    rep = pq._layer_report("l", RECIPES["w4g64"].replace(method="gptq"), w, q, st_)
    assert rtn_calls == []  # gptq's fallback rounded and measured RTN already
    assert rep.loss == layer_loss(w, q.dequantize(), st_.hessian)  # bit for bit what the report measured before
    assert rep.rtn_loss == layer_loss(w, quantize(w, scheme).dequantize(), st_.hessian)
    again = pq._layer_report("l", RECIPES["w4g64"].replace(method="gptq"), w, q, st_)  # taken once: measured now
    assert rtn_calls == [1] and (again.loss, again.rtn_loss) == (rep.loss, rep.rtn_loss)


def test_runner_reports_seconds_by_phase_and_each_block_bar_ends_at_its_total(monkeypatch, gen):
    from lowbit.pipeline import sequential

    bars = []

    class Bar(sequential.tqdm):
        def close(self):
            if not self.disable and self.total is not None and self.desc.startswith("block"):  # closed once
                bars.append((self.desc, self.n, self.total))
            super().close()
    monkeypatch.setattr(sequential, "tqdm", Bar)
    model = tiny_transformer("qwen2", 2)
    batches = [torch.randint(0, model.config.vocab_size, (2, 32), generator=gen) for _ in range(3)]
    q = lowbit.quantize(model, "w4g64", calibration=batches, method="gptq", progress=True)
    rep = q.lowbit_calibration
    assert set(rep.phases) == {"load", "statistics", "transform", "solve", "forward", "write"}
    assert len(rep.block_seconds) == 2 and sum(rep.block_seconds) <= rep.seconds
    assert sum(rep.phases.values()) <= rep.seconds and rep.phases["solve"] > 0
    assert "seconds by phase" in rep.summary()
    assert [d for d, _, _ in bars] == ["block 0", "block 1"]
    assert all(n == total > 0 for _, n, total in bars), bars
