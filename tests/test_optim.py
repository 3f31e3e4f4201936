"""8-bit Adam: maps equal bitsandbytes', steps equal float64 and torch.optim references, state
round trips, small tensors and StableEmbedding keep 32-bit state."""
import copy
import io

import numpy as np
import pytest
import torch

from lowbit import formats
from lowbit.kernels.adam8bit import adam8bit_step, round_to_map
from lowbit.optim import (Adam, Adam8bit, AdamW8bit, dequantize_blockwise, quantize_blockwise, quantize_second_moment,
                          state_nbytes)
from lowbit.optim.blockwise import BLOCK, SIGNED, UNSIGNED
from lowbit.optim.stable_embedding import StableEmbedding, keep_embeddings_32bit
from reference.adam8bit_ref import adamw8bit_step as ref_step
from reference.bnb_dynamic_map import create_dynamic_map

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("signed, name", [(True, "dynamic8"), (False, "dynamic8_unsigned")])
def test_state_maps_equal_bitsandbytes_dynamic_map(signed, name):
    assert torch.equal(formats.get(name).values.float(), create_dynamic_map(signed=signed))


def test_blockwise_round_trip_is_nearest_map_value(gen):
    x = torch.randn(2 * BLOCK + 77, generator=gen) * torch.logspace(-6, 0, 2 * BLOCK + 77)
    codes, absmax = quantize_blockwise(x, SIGNED)
    assert codes.numel() == 3 * BLOCK and absmax.shape == (3,)
    back = dequantize_blockwise(codes, absmax, SIGNED, x.numel())
    table = SIGNED.values.double()
    for b in range(3):
        part = x[b * BLOCK:(b + 1) * BLOCK].double()
        amax = part.abs().max()
        assert absmax[b] == amax.float()
        want = table[(part[:, None] / amax - table[None, :]).abs().argmin(dim=1)] * amax
        torch.testing.assert_close(back[b * BLOCK:(b + 1) * BLOCK].double(), want, rtol=1e-6, atol=0)
    assert (codes[x.numel():] == SIGNED.zero).all()  # padding decodes to 0


@pytest.mark.parametrize("qmap", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
def test_kernel_rounding_equals_bucketize_at_every_edge(qmap, gen):
    mids = qmap.mids
    x = torch.cat([torch.rand(200_000, generator=gen) * 2 - 1, torch.logspace(-9, 0, 20_000),
                   -torch.logspace(-9, 0, 20_000), qmap.values, mids, torch.nextafter(mids, torch.tensor(2.0)),
                   torch.nextafter(mids, torch.tensor(-2.0)), torch.tensor([0.0, -0.0, 1.0, -1.0]),
                   # beyond the table's span: tiny magnitudes and |x| > 1 clamp to its ends
                   torch.tensor([1e-30, -1e-30, 1e-42, -1e-42, 1.004, -1.004, 3.0, -3.0, float("inf"), -float("inf")])])
    assert torch.equal(round_to_map(x, mids), torch.bucketize(x, mids, right=True).to(torch.uint8))


def _fresh_state(n, gen):
    """A state some steps into training: moments of realistic shape, encoded."""
    m = torch.randn(n, generator=gen) * 1e-3
    v = torch.rand(n, generator=gen) * 1e-6
    return (*quantize_blockwise(m, SIGNED), *quantize_blockwise(v, UNSIGNED))


def test_8bit_step_matches_float64_reference(gen):
    n = 2 * BLOCK + 300
    p = torch.randn(n, generator=gen)
    c1, a1, c2, a2 = _fresh_state(n, gen)
    rp, rc1, ra1, rc2, ra2 = (p.double().numpy(), c1.numpy().astype(int), a1.double().numpy(),
                              c2.numpy().astype(int), a2.double().numpy())
    m1, m2 = SIGNED.values.double().numpy(), UNSIGNED.values.double().numpy()
    opt = AdamW8bit([torch.nn.Parameter(p.clone())], lr=HYPER["lr"], betas=(0.9, 0.99), weight_decay=0.1,
                    use_kernel=False)
    param = opt.param_groups[0]["params"][0]
    param.grad = torch.zeros(n)
    opt.step()  # creates the state; replace it by the prepared one
    param.data.copy_(p)
    st = opt.state[param]
    st["step"].fill_(4)
    st["m_codes"], st["m_absmax"], st["v_codes"], st["v_absmax"] = c1.clone(), a1.clone(), c2.clone(), a2.clone()
    for k in range(3):
        g = torch.randn(n, generator=gen) * 1e-2
        param.grad = g
        opt.step()
        rp, rc1, ra1, rc2, ra2 = ref_step(rp, g.double().numpy(), rc1, ra1, rc2, ra2, m1, m2, block=BLOCK,
                                          step=5 + k, **HYPER)
    np.testing.assert_allclose(param.detach().double().numpy(), rp, rtol=0, atol=2e-6)
    np.testing.assert_allclose(st["m_absmax"].numpy(), ra1, rtol=1e-5)
    np.testing.assert_allclose(st["v_absmax"].numpy(), ra2, rtol=1e-5)
    assert (st["m_codes"][:n].numpy() == rc1[:n]).mean() > 0.999  # float32 vs float64 near ties
    assert (st["v_codes"][:n].numpy() == rc2[:n]).mean() > 0.999


@pytest.mark.parametrize("decoupled", [False, True])
def test_fused_kernel_matches_torch_path(gen, decoupled):
    n = 3 * BLOCK + 5
    p = torch.randn(n, generator=gen)
    c1, a1, c2, a2 = _fresh_state(n, gen)
    fast = [t.clone() for t in (p, c1, a1, c2, a2)]
    slow = Adam([torch.nn.Parameter(p.clone())], state_bits=8, decoupled=decoupled, use_kernel=False,
                lr=HYPER["lr"], betas=(0.9, 0.99), weight_decay=0.1)
    sp = slow.param_groups[0]["params"][0]
    sp.grad = torch.zeros(n)
    slow.step()
    sp.data.copy_(p)
    st = slow.state[sp]
    st["m_codes"], st["m_absmax"], st["v_codes"], st["v_absmax"] = c1.clone(), a1.clone(), c2.clone(), a2.clone()
    # one step: the two paths round float32 in different orders (torch may fuse multiply-adds),
    # so a moment code can flip at a near-tie, and a flipped code would move later steps apart
    g = torch.randn(n, generator=gen) * 1e-2
    sp.grad = g
    slow.step()
    assert adam8bit_step(fast[0], g, *fast[1:], SIGNED, UNSIGNED, BLOCK, **HYPER, decoupled=decoupled, step=2)
    torch.testing.assert_close(fast[0], sp.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(fast[2], st["m_absmax"], rtol=1e-5, atol=0)
    torch.testing.assert_close(fast[4], st["v_absmax"], rtol=1e-5, atol=0)
    assert (fast[1] == st["m_codes"]).float().mean() > 0.999
    assert (fast[3] == st["v_codes"]).float().mean() > 0.999



def test_second_moment_never_rounds_a_positive_value_to_zero(gen):
    v = torch.rand(BLOCK + 9, generator=gen) * torch.logspace(-14, 0, BLOCK + 9)
    v[5], v[7] = 0.0, 1e-30
    codes, absmax = quantize_second_moment(v)
    plain, _ = quantize_blockwise(v, UNSIGNED)
    back = dequantize_blockwise(codes, absmax, UNSIGNED, v.numel())
    low = plain[: v.numel()] == UNSIGNED.zero
    assert low.sum() > 100  # the case exists: round-to-nearest sends these to 0
    assert ((back > 0) == (v > 0)).all() and codes[5] == UNSIGNED.zero
    pos = low & (v > 0)
    torch.testing.assert_close(back[pos], UNSIGNED.values[1] * absmax[(pos.nonzero()[:, 0] // BLOCK)], rtol=0, atol=0)
    assert torch.equal(codes[: v.numel()][~pos], plain[: v.numel()][~pos])  # everything else: nearest, as before


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "torch"])
def test_8bit_step_stays_bounded_where_v_is_far_below_its_block_absmax(use_kernel):
    """A tied embedding's block: one large gradient sets the block's absmax, the rest are 1e-5 of
    it (their v, 1e-10 of the absmax, lies under the unsigned map's smallest level), then stop (a
    token not in the batch). With v rounded to 0, m / (sqrt(v) + eps) moved those weights by 0.37
    (370x lr) in one step; exact Adam moves them by at most ~lr, and the 8-bit step must not exceed it."""
    n = 2 * BLOCK
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(3))
    lr = 1e-3
    ours = torch.nn.Parameter(p0.clone())
    ref = torch.nn.Parameter(p0.clone())
    opt = AdamW8bit([ours], lr=lr, weight_decay=0.0, use_kernel=use_kernel)
    opt_ref = torch.optim.AdamW([ref], lr=lr, weight_decay=0.0)
    for step in range(6):
        g = torch.full((n,), 0.0 if step else 1e-5)
        g[:: BLOCK] = 1.0  # each block's absmax
        for q, o in ((ours, opt), (ref, opt_ref)):
            q.grad = g.clone()
            o.step()
        moved, moved_ref = (ours - p0).abs().detach(), (ref - p0).abs().detach()
        assert (moved <= moved_ref * (1 + 1e-3) + 1e-7).all(), f"step {step + 1}: {moved.max():.3g} vs {moved_ref.max():.3g}"
        torch.testing.assert_close(moved[:: BLOCK], moved_ref[:: BLOCK], rtol=1e-3, atol=0)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 8))


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.mark.parametrize("ours, theirs", [
    (lambda ps: Adam(ps, lr=1e-2, weight_decay=0.1), lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1)),
    (lambda ps: Adam(ps, lr=1e-2, weight_decay=0.1, decoupled=True),
     lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
])
def test_32bit_state_matches_torch_optim(ours, theirs):
    a, b = _model(), _model()
    _train(a, ours(a.parameters()), 5)
    _train(b, theirs(b.parameters()), 5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_8bit_adam_tracks_32bit_on_a_small_problem():
    a, b = _model(), _model()
    la = _train(a, AdamW8bit(a.parameters(), lr=3e-3, min_8bit_size=1024), 40)
    lb = _train(b, torch.optim.AdamW(b.parameters(), lr=3e-3, weight_decay=1e-2), 40)
    assert abs(la - lb) < 0.05 * lb
    assert any(p.numel() >= 1024 for p in a.parameters())


def test_state_bits_choice_and_bytes():
    big = torch.nn.Parameter(torch.zeros(10 * BLOCK))
    small = torch.nn.Parameter(torch.zeros(4095))
    pinned = torch.nn.Parameter(torch.zeros(10 * BLOCK))
    pinned.optim_bits = 32
    opt = AdamW8bit([big, small, pinned])
    for p in (big, small, pinned):
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[big]) == {"step", "m_codes", "m_absmax", "v_codes", "v_absmax"}
    assert "exp_avg" in opt.state[small] and "exp_avg" in opt.state[pinned]
    only_big = AdamW8bit([torch.nn.Parameter(torch.zeros(10 * BLOCK))])
    only_big.param_groups[0]["params"][0].grad = torch.ones(10 * BLOCK)
    only_big.step()
    assert 2.0 < state_nbytes(only_big) / (10 * BLOCK) < 2.01
    with pytest.raises(ValueError, match="state_bits"):
        Adam([big], state_bits=4)


def test_keep_embeddings_32bit_marks_a_tied_embedding_once():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(64, 128)
            self.body = torch.nn.Linear(128, 128)
            self.head = torch.nn.Linear(128, 64, bias=False)
            self.head.weight = self.embed.weight  # tied, as SmolLM2's LM head

        def forward(self, ids):
            return self.head(self.body(self.embed(ids)))

    model = Tied()
    assert keep_embeddings_32bit(model) == 64 * 128
    opt = AdamW8bit(model.parameters(), lr=1e-3)
    model(torch.arange(64)).pow(2).mean().backward()
    opt.step()
    assert "exp_avg" in opt.state[model.embed.weight]  # 32-bit state, shared with the head
    assert "m_codes" in opt.state[model.body.weight]  # 16,384 values: 8-bit
    assert len(opt.state) == 3


def test_state_dict_round_trip_resumes_identically():
    a = _model()
    opt_a = AdamW8bit(a.parameters(), lr=3e-3, min_8bit_size=1024)
    _train(a, opt_a, 3)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    b = copy.deepcopy(a)
    opt_b = AdamW8bit(b.parameters(), lr=3e-3, min_8bit_size=1024)
    opt_b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    _train(a, opt_a, 3, seed=7)
    _train(b, opt_b, 3, seed=7)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def _half_params(dtype):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(2 * BLOCK).to(dtype)), torch.nn.Parameter(torch.randn(BLOCK).to(dtype))]


def _half_steps(params, opt, first, last):
    """Steps first..last-1 with gradients fixed by the step number; the second parameter's are
    ~1e-5, so its v_absmax (~1e-13) lies far below fp16's smallest subnormal (6e-8)."""
    for step in range(first, last):
        g = torch.Generator().manual_seed(step)
        params[0].grad = torch.randn(2 * BLOCK, generator=g).to(params[0].dtype)
        params[1].grad = (torch.randn(BLOCK, generator=g) * 1e-5).to(params[1].dtype)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_8bit_state_of_half_parameters_resumes_bit_for_bit(dtype):
    """torch's load_state_dict casts floating state to the parameter's dtype: absmax in bf16/fp16
    loses bits and an fp16 v_absmax under 6e-8 becomes 0, which the second-moment rule forbids."""
    straight = _half_params(dtype)
    opt = AdamW8bit(straight, lr=1e-3, min_8bit_size=1024)
    _half_steps(straight, opt, 0, 6)

    first = _half_params(dtype)
    opt_a = AdamW8bit(first, lr=1e-3, min_8bit_size=1024)
    _half_steps(first, opt_a, 0, 3)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt_b = AdamW8bit(resumed, lr=1e-3, min_8bit_size=1024)
    opt_b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
        assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert 0 < opt_b.state[resumed[1]]["v_absmax"].max() < 6e-8  # the tiny case is exercised
    _half_steps(resumed, opt_b, 3, 6)
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
    for sa, sb in zip(opt.state.values(), opt_b.state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_adam8bit_adds_l2_decay_to_the_gradient():
    p = torch.nn.Parameter(torch.ones(BLOCK * 2))
    opt = Adam8bit([p], lr=0.1, weight_decay=1.0)
    p.grad = torch.zeros_like(p)
    opt.step()  # gradient is wd * p = 1 everywhere: Adam's first step moves by lr
    torch.testing.assert_close(p.detach(), torch.full_like(p, 0.9), rtol=0, atol=1e-5)


def test_stable_embedding_norms_output_and_keeps_32bit_state():
    torch.manual_seed(0)
    emb = StableEmbedding(1000, 64, padding_idx=0)
    bound = (6 / (1000 + 64)) ** 0.5
    assert emb.weight.abs().max() <= bound and emb.weight.abs().max() > 0.9 * bound
    assert torch.equal(emb.weight[0], torch.zeros(64))
    out = emb(torch.tensor([[1, 2, 3]]))
    torch.testing.assert_close(out.mean(-1), torch.zeros(1, 3), atol=1e-5, rtol=0)
    opt = AdamW8bit(emb.parameters())
    out.sum().backward()
    opt.step()
    assert "exp_avg" in opt.state[emb.weight]
