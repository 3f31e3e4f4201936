"""The calibration activations at one block boundary, held in memory up to a limit and spilled to
disk (one safetensors file per batch) past it.

The sequential runner (sequential.py) holds one block's inputs and its outputs at a time. For an
8B model and 128 windows of 2048 tokens that is 4 GiB each in float32, more than a laptop spares
beside the block's weights and Hessians; with a limit, the batches past it are written to files
under `folder` and read back when the block runs on them (the same tensors, bit for bit), and a
message says so once.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .blocks import BlockInput


@dataclass
class SpillPolicy:
    """Keep at most `limit_bytes` of hidden states in memory per boundary; the rest go to `folder`."""
    limit_bytes: int
    folder: Path
    spilled_bytes: int = 0  # the most written at one boundary (the calibration report shows it)
    _told: bool = False

    def tell(self, total_mb: float) -> None:
        if not self._told:
            print(f"calibration activations exceed the in-memory limit of {self.limit_bytes / 2**20:.0f} MB: "
                  f"spilling block inputs/outputs to {self.folder} (safetensors, read back per batch)",
                  file=sys.stderr)
            self._told = True


class Activations:
    """A list of BlockInput (hidden states + the block's other arguments, which stay in memory)."""

    def __init__(self, policy: SpillPolicy | None, tag: str):
        self.policy, self.tag = policy, tag
        self._items: list[tuple[torch.Tensor | Path, dict]] = []
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.tokens = 0  # positions over all batches (hidden [*, dim] without dim)

    def append(self, hidden: "torch.Tensor | BlockInput", kwargs: dict | None = None) -> None:
        """Add a batch: (hidden, kwargs), or a BlockInput (as capture_inputs appends)."""
        if isinstance(hidden, BlockInput):
            hidden, kwargs = hidden.hidden, hidden.kwargs
        n = hidden.numel() * hidden.element_size()
        self.tokens += hidden.shape[:-1].numel()
        p = self.policy
        if p is not None and self.memory_bytes + n > p.limit_bytes:
            p.folder.mkdir(parents=True, exist_ok=True)
            path = p.folder / f"{self.tag}-{len(self._items):05d}.safetensors"
            from safetensors.torch import save_file

            save_file({"hidden": hidden.contiguous()}, str(path))
            self._items.append((path, kwargs))
            self.disk_bytes += n
            p.spilled_bytes = max(p.spilled_bytes, self.disk_bytes)
            p.tell(self.disk_bytes / 2**20)
        else:
            self._items.append((hidden, kwargs))
            self.memory_bytes += n

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> BlockInput:
        hidden, kwargs = self._items[i]
        if isinstance(hidden, Path):
            from safetensors.torch import load_file

            hidden = load_file(str(hidden))["hidden"]
        return BlockInput(hidden, kwargs)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def drop(self) -> None:
        """Forget the batches and delete their files."""
        for hidden, _ in self._items:
            if isinstance(hidden, Path):
                hidden.unlink(missing_ok=True)
        self._items.clear()
        self.memory_bytes = self.disk_bytes = 0
