"""`--ray`: streaming quantization with the weights (data-free) or the layer solves (gptq) as tasks on
a local Ray cluster of 2 workers gives the single process's bytes (io/streaming/ray.py)."""
import pytest
import ray  # the optional `scale` extra; scripts/env.sh installs it for the tests
import torch

from lowbit.io.streaming.rows import StoredTensor
from lowbit.io.streaming import quantize_checkpoint
from lowbit.io.streaming.ray import RayPool
from lowbit.pipeline import get_recipe

from test_streaming import SHARD, files, tiny_llama


@pytest.fixture(scope="module")
def pool():
    p = RayPool(num_cpus=2)
    yield p
    ray.shutdown()


@pytest.mark.parametrize("tied", [False, True])
def test_data_free_tasks_give_the_single_process_bytes(tmp_path, pool, monkeypatch, tied):
    src = tiny_llama(tmp_path / "src", tied=tied, layers=2)
    one = quantize_checkpoint(src, "w4g64", tmp_path / "one", shard_bytes=SHARD, progress=False)
    local_reads = []  # weights read in this process: none, the tasks read them in the workers
    read = StoredTensor.read_rows
    monkeypatch.setattr(StoredTensor, "read_rows", lambda self, a, b: local_reads.append(self.name) or read(self, a, b))
    submitted = []
    submit = pool.submit
    monkeypatch.setattr(pool, "submit", lambda fn, *a: submitted.append(a[0].name) or submit(fn, *a))
    spread = quantize_checkpoint(src, "w4g64", tmp_path / "ray", shard_bytes=SHARD, ray=pool, block_bytes=16 << 10,
                                 progress=False)
    assert files(spread) == files(one) and not local_reads
    assert len(submitted) == 2 * 7 + (1 if tied else 2)  # every weight a task: the blocks', the table, the head
    assert pool.width == 2


def test_gptq_layer_solves_as_tasks_give_the_single_process_bytes(tmp_path, pool):
    src = tiny_llama(tmp_path / "src", layers=2)
    g = torch.Generator().manual_seed(7)
    calib = [torch.randint(0, 384, (1, 24), generator=g) for _ in range(4)]
    kw = dict(calibration=calib, shard_bytes=SHARD, calibration_dtype="fp32", batch_size=2, progress=False)
    gptq = get_recipe("w4g64", "gptq")
    one = quantize_checkpoint(src, gptq, tmp_path / "one", **kw)
    calls = []
    call_solver = pool.call_solver

    def counted(*a):
        calls.append(a[0].__name__)
        return call_solver(*a)
    pool.call_solver = counted
    try:
        spread = quantize_checkpoint(src, gptq, tmp_path / "ray", ray=pool, **kw)
    finally:
        pool.call_solver = call_solver
    assert files(spread) == files(one)
    assert calls == ["gptq"] * 14  # every layer of both blocks solved by a task


def test_cli_ray_flag(tmp_path, pool, capsys):
    from lowbit.cli import main as cli

    src = tiny_llama(tmp_path / "src", layers=2)
    one = quantize_checkpoint(src, "w4g64", tmp_path / "one", progress=False)
    cli(["quantize", str(src), "--recipe", "w4g64", "--method", "rtn", "--out", str(tmp_path / "out"), "--ray"])
    assert "Ray: 2 CPUs (a local cluster)" in capsys.readouterr().out
    assert files(tmp_path / "out") == files(one)
    assert cli(["quantize", "smollm2-135m", "--method", "rtn", "--out", str(tmp_path / "x"), "--ray"]) == 2
    assert "--ray spreads the streaming quantization" in capsys.readouterr().err
