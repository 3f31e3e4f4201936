"""Same model, calibration and seed give byte-identical checkpoint files, in this process and
in a fresh one (another hash seed, another numba/torch thread start-up)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

import lowbit
from conftest import tiny_transformer

METHODS = ("rtn", "hqq", "gptq")
TESTS = Path(__file__).resolve().parent


def save_all(out: str | Path) -> None:
    """One checkpoint per method under `out`, from a tiny 2-layer Qwen2 (seeded) and fixed ids."""
    for method in METHODS:
        model = tiny_transformer("qwen2", 2)  # seeds torch itself
        gen = torch.Generator().manual_seed(7)
        ids = [torch.randint(0, model.config.vocab_size, (2, 32), generator=gen) for _ in range(4)]
        lowbit.quantize(model, "w4g64", calibration=ids if method == "gptq" else None, method=method,
                        progress=False)
        lowbit.save(model, Path(out) / method, source="tiny-qwen2")


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_checkpoints_are_byte_identical_across_runs_and_processes(tmp_path):
    save_all(tmp_path / "a")
    save_all(tmp_path / "b")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    code = (f"import sys; sys.path[:0] = [{str(TESTS)!r}]; "
            "from test_io_deterministic import save_all; save_all(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], check=True, env=env, cwd=TESTS.parent,
                   timeout=600)
    for method in METHODS:
        a, b, c = (files(tmp_path / run / method) for run in "abc")
        assert set(a) == {"lowbit.json", "model.safetensors"}
        assert a == b, f"{method}: two runs in one process differ"
        assert a == c, f"{method}: a fresh process writes different bytes"
    # the comparison can fail: the three methods write three different weight files
    weights = {files(tmp_path / "a" / m)["model.safetensors"] for m in METHODS}
    assert len(weights) == len(METHODS)
