"""Ray as the engine for the independent work of streaming quantization (`lowbit quantize --ray`).

- Data-free methods: one Ray task per weight. The task reads its weight from the source shard
  itself (io/streaming/rows.py, a block of rows at a time for rtn/mse) and returns the QTensor;
  the driver holds the skeleton, assembles each part and writes the output shards. The next part's
  tasks are submitted before the current part is assembled, so the workers do not wait on the
  driver's writes. On a cluster the checkpoint must be on storage every node reads at the same path.
- Calibrated methods (gptq): the driver runs the blocks' forwards and gathers the statistics
  (calibrated.py); each layer's solve (its weight and Hessian) is a task, all the layers
  of a block at once.

A task runs the very function the single process runs, with the driver's torch thread count (so
that BLAS sums in the same order), and the output is byte-identical (tests/test_streaming_ray.py).
Ray is an optional dependency (`pip install lowbit[scale]`), imported here only.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import parts
from .parts import quantize_stored, under


class RayPool:
    """A connection to a Ray cluster: the local machine by default (`ray.init()`), or `address`
    ("ray://head:10001", "auto"). num_cpus: the local cluster's size (ignored with an address)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        try:
            import ray
        except ImportError as e:
            raise ValueError("--ray needs Ray, an optional dependency: pip install 'lowbit[scale]' "
                             "(or pip install ray)") from e
        self.ray = ray
        if not ray.is_initialized():
            kw = {"address": address} if address else {"num_cpus": num_cpus}
            ray.init(include_dashboard=False, logging_level="warning", **kw)
        self.width = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.threads = torch.get_num_threads()
        self._task = ray.remote(num_cpus=1)(_run)

    def submit(self, fn, *args, **kwargs):
        return self._task.remote(fn, args, kwargs, self.threads)

    def get(self, ref):
        return self.ray.get(ref)

    def call_solver(self, fn, w: torch.Tensor, scheme, stats, options: dict):
        """pipeline.quantize's call_solver: the solve as a task (its InputStats travel along)."""
        from ...pipeline.quantize import call

        return self.get(self.submit(call, fn, w, scheme, stats, options))


def _run(fn, args, kwargs, threads: int):
    torch.set_num_threads(threads)
    return fn(*args, **kwargs)


def quantize_parts(model: nn.Module, recipe, all_parts: list, where: dict[str, Path], output, pool: RayPool, *,
                   block_bytes: int, progress: bool = True) -> None:
    """The data-free loop of streaming.quantize_checkpoint with the weights quantized by Ray tasks."""
    from ...pipeline.quantize import weight_plan
    from .rows import stored_tensors

    todo = [p for p in all_parts if p.name not in output.done]
    headers: dict[Path, dict] = {}

    def submit(part) -> dict:
        """{module name: the task quantizing its weight} for the part's weights the recipe rounds."""
        names = {n for n, _ in model.named_modules() if under(n, part.modules)}
        futures = {}
        for name, (solver, scheme, options) in weight_plan(model, recipe, modules=names).items():
            key = f"{name}.weight"
            if key in where:
                if where[key] not in headers:
                    headers[where[key]] = stored_tensors(where[key])
                stored = headers[where[key]][where.stored_name(key)]
                futures[name] = pool.submit(quantize_stored, stored, solver, scheme, options,
                                            block_bytes)
        return futures

    ahead = submit(todo[0]) if todo else {}
    bar = tqdm(todo, desc="quantize (streaming, ray)", unit="part", disable=not progress)
    for i, part in enumerate(bar):
        futures, ahead = ahead, (submit(todo[i + 1]) if i + 1 < len(todo) else {})
        bar.set_postfix_str(part.name)
        parts.materialize(model, part, where, set(futures), defer_bytes=0)  # the tasks read those weights

        def solve(name, solver, scheme, options):
            return pool.get(futures[name]) if name in futures else None
        parts.quantize_part(model, recipe, part, solve)
        output.add(model, part)
