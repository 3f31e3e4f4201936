"""The compressed all-reduce DDP hook on two CPU processes (gloo): gradients equal the exact
average within the rounding error, the residual is carried, bytes are counted."""
import gc
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit.optim.comm_hooks import CompressionState, compressed_allreduce_hook

WORLD = 2


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def _local_grads(model, x):
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def _worker(rank: int, init_file: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for fmt in ("int8", "fp8_e4m3"):
            _check_format(rank, fmt)
        gc.collect()  # the DDP reducers go before their process group does
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _check_format(rank: int, fmt: str):
    ddp = torch.nn.parallel.DistributedDataParallel(_model())
    state = CompressionState(format=fmt, group_size=256)
    ddp.register_comm_hook(state, compressed_allreduce_hook)
    plain = _model()
    n = sum(p.numel() for p in plain.parameters())
    levels = {"int8": 127, "fp8_e4m3": 2 ** 3}[fmt]  # int8 step, or fp8's relative step
    for step in range(3):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(10 * step + rank))
        exact = _local_grads(plain, x)  # this rank's own gradients, then the true average
        for g in exact:
            dist.all_reduce(g)
            g /= WORLD
        ddp.zero_grad()
        ddp(x).pow(2).sum().backward()
        for p, g in zip(ddp.parameters(), exact):
            # each rank's error is under its group absmax / levels, and error feedback adds
            # at most the carried residual of the same size
            tol = 2 * max(q.abs().max().item() for q in exact) / levels
            err = (p.grad - g).abs().max().item()
            assert err <= tol, (fmt, step, err, tol)
            assert not torch.equal(p.grad, g)  # the hook really rounded
        residual = torch.cat([r for r in state.residuals.values()])
        assert residual.numel() == n and residual.abs().max() > 0
    assert state.bytes_per_step == n + 4 * sum(-(-b.numel() // 256) for b in state.residuals.values())
    assert state.bytes_sent == 3 * state.bytes_per_step and state.bytes_uncompressed == 3 * 4 * n


def test_hook_on_two_gloo_processes():
    """int8 and fp8_e4m3, one spawn (starting processes costs most of the test's time)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"),), nprocs=WORLD, join=True)


def test_residual_makes_the_mean_of_rounded_sums_exact():
    """Error feedback: over k steps the sum of sent values equals the sum of true values up to the
    last residual (a single process, the hook's compress step only)."""
    from lowbit.optim.comm_hooks import compress

    state = CompressionState(format="int8", group_size=64)
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e-3
    residual = torch.zeros_like(g)
    sent = torch.zeros_like(g)
    for _ in range(50):
        target = g + residual
        q, _ = compress(target, state)
        sent += q.dequantize()
        residual = target - q.dequantize()
    torch.testing.assert_close(sent + residual, 50 * g, rtol=0, atol=1e-6)
    assert (sent / 50 - g).abs().max() < (q.dequantize() - target).abs().max()  # averaging beats one rounding


def test_bad_format_is_named():
    with pytest.raises(ValueError, match="format"):
        CompressionState(format="int4")
