"""Stochastic rounding to bf16: unbiased, exact on bf16 values, and it keeps small updates alive."""
import pytest
import torch

from lowbit.core.rounding import stochastic_round_bf16
from lowbit.optim import Adam
from lowbit.optim.stochastic import StochasticRounding


def _neighbours(x: torch.Tensor):
    """The bf16 values either side of float32 x (by truncating toward zero, then one ulp outward)."""
    lo = (x.view(torch.int32) & -65536).view(torch.float32)
    hi = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    return lo, hi


def test_stochastic_round_bf16_is_unbiased(gen):
    x = (torch.randn(64, generator=gen) * torch.logspace(-3, 3, 64)).float()
    reps = 20000
    r = stochastic_round_bf16(x.repeat(reps, 1), gen).float()
    lo, hi = _neighbours(x)
    assert ((r == lo) | (r == hi)).all()
    # each draw is lo or hi, so its std is at most (hi - lo) / 2; the mean's 6-sigma bound:
    bound = 6 * (hi - lo).abs() / 2 / reps ** 0.5
    assert ((r.double().mean(0) - x.double()).abs() <= bound.double()).all()
    p_up = (r == hi).double().mean(0)
    want = ((x - lo) / (hi - lo)).double()
    assert ((p_up - want).abs() <= 6 * 0.5 / reps ** 0.5).all()


def test_stochastic_round_bf16_keeps_representable_values(gen):
    b = torch.randn(10000, generator=gen).to(torch.bfloat16)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, 3.0e38], dtype=torch.bfloat16)
    for v in (b, special):
        out = stochastic_round_bf16(v.float(), gen)
        assert torch.equal(out.view(torch.int16), v.view(torch.int16))
    assert stochastic_round_bf16(torch.tensor([float("nan")]), gen).isnan().all()
    with pytest.raises(ValueError, match="float32"):
        stochastic_round_bf16(torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("rounding, moved", [("nearest", 0.0), ("stochastic", 0.01)])
def test_small_updates_vanish_under_nearest_and_survive_stochastic(rounding, moved):
    # each SGD step moves the weight by 1e-4, under half a bf16 ulp at 1.0 (2^-8 / 2 = 0.0039)
    w = torch.nn.Parameter(torch.ones(20000, dtype=torch.bfloat16))
    opt = StochasticRounding(torch.optim.SGD([w], lr=1e-4), rounding=rounding,
                             generator=torch.Generator().manual_seed(0))
    for _ in range(100):
        w.grad = torch.ones_like(w)
        opt.step()
    assert w.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert abs((1.0 - w.float().mean().item()) - moved) < 5e-4


def test_adam_option_rounds_bf16_parameters_stochastically():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(20000, dtype=torch.bfloat16))
    opt = Adam([w], lr=1e-4, stochastic_rounding=True)
    for _ in range(50):
        w.grad = torch.ones_like(w)
        opt.step()  # Adam's step is lr per element for a constant gradient
    assert abs((1.0 - w.float().mean().item()) - 50e-4) < 5e-4
    assert opt.state[w]["exp_avg"].dtype == torch.float32
