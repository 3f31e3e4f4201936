"""Granularity as a value, turned into groups in one place.

`group_view(shape, g)` returns a GroupView that cuts a tensor of that shape
into 2-D parts [groups, length] (one scale per row) and puts them back. A
group size that does not divide its axis leaves a ragged last group: the
view then has two parts (full groups and tails), so statistics are exact and
nothing is padded. Per-group statistics (scales, zeros) have a natural shape:

    tensor          ()
    channel(axis)   (shape[axis],)
    token           shape[:-1]
    group(g, axis)  shape with axis moved last and replaced by ceil(n / g)
    block(r, c)     (rows / r, cols / c) for a 2-D tensor
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PerTensor:
    pass


@dataclass(frozen=True)
class PerChannel:
    axis: int = 0


@dataclass(frozen=True)
class PerToken:
    pass


@dataclass(frozen=True)
class PerGroup:
    size: int
    axis: int = -1


@dataclass(frozen=True)
class PerBlock:
    rows: int
    cols: int


Granularity = PerTensor | PerChannel | PerToken | PerGroup | PerBlock
KINDS = {"tensor": PerTensor, "channel": PerChannel, "token": PerToken, "group": PerGroup, "block": PerBlock}


def granularity_name(g: Granularity) -> str:
    return next(k for k, cls in KINDS.items() if isinstance(g, cls))


def make_granularity(kind: str | Granularity, *, group_size: int | None = None, axis: int | None = None,
                     block: tuple[int, int] | None = None) -> Granularity:
    """From the keyword form of quantize_tensor to a Granularity value."""
    if not isinstance(kind, str):
        return kind
    if kind not in KINDS:
        raise ValueError(f"granularity={kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "group":
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"granularity='group' needs group_size, a positive int (got {group_size!r})")
        return PerGroup(group_size, -1 if axis is None else axis)
    if kind == "block":
        if block is None or len(block) != 2 or min(block) < 1:
            raise ValueError(f"granularity='block' needs block=(rows, cols) of positive ints (got {block!r})")
        return PerBlock(int(block[0]), int(block[1]))
    if kind == "channel":
        return PerChannel(0 if axis is None else axis)
    return KINDS[kind]()


class GroupView:
    """Cuts a tensor of `shape` into parts [G_i, L_i] and back; see the module doc."""

    def __init__(self, shape: tuple[int, ...], g: Granularity):
        self.shape, self.g = tuple(shape), g
        nd = len(self.shape)
        if isinstance(g, (PerChannel, PerGroup)) and nd and not -nd <= g.axis < nd:
            raise ValueError(f"axis {g.axis} is out of range for a tensor of shape {self.shape}")
        if isinstance(g, (PerChannel, PerToken, PerGroup)) and nd == 0:
            raise ValueError(f"granularity {granularity_name(g)} needs a tensor with at least one dimension")
        if isinstance(g, PerBlock):
            if nd != 2:
                raise ValueError(f"block granularity needs a 2-D tensor, got shape {self.shape}")
            r, c = self.shape
            if r % g.rows or c % g.cols:
                raise ValueError(f"block ({g.rows}, {g.cols}) does not divide shape {self.shape}; "
                                 "choose a block that divides it or use group granularity")
        self.stats_shape = self._stats_shape()

    def _stats_shape(self) -> tuple[int, ...]:
        s, g = self.shape, self.g
        if isinstance(g, PerTensor):
            return ()
        if isinstance(g, PerChannel):
            return (s[g.axis],)
        if isinstance(g, PerToken):
            return s[:-1]
        if isinstance(g, PerGroup):
            moved = _moved(s, g.axis)
            return moved[:-1] + (math.ceil(moved[-1] / g.size),)
        return (s[0] // g.rows, s[1] // g.cols)

    @property
    def row_major(self) -> bool:
        """True when parts() is one part whose rows tile the tensor in memory order,
        so merge() of it is a reshape."""
        g, nd = self.g, len(self.shape)
        if isinstance(g, (PerTensor, PerToken)):
            return True
        if isinstance(g, PerChannel):
            return g.axis % nd == 0
        if isinstance(g, PerGroup):
            return g.axis % nd == nd - 1 and self.shape[g.axis] % g.size == 0
        return False

    # -- element tensors -----------------------------------------------------
    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        g = self.g
        if isinstance(g, PerTensor):
            return [x.reshape(1, -1)]
        if isinstance(g, PerChannel):
            return [x.movedim(g.axis, 0).reshape(self.shape[g.axis], -1)]
        if isinstance(g, PerToken):
            return [x.reshape(-1, self.shape[-1])]
        if isinstance(g, PerBlock):
            R, C = self.shape
            return [x.reshape(R // g.rows, g.rows, C // g.cols, g.cols).permute(0, 2, 1, 3).reshape(-1, g.rows * g.cols)]
        rows, n, full = self._group_dims()
        xm = x.movedim(g.axis, -1).reshape(rows, n)
        out = [xm[:, : full * g.size].reshape(rows * full, g.size)] if full else []
        if n % g.size:
            out.append(xm[:, full * g.size:])
        return out

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        g = self.g
        if isinstance(g, (PerTensor, PerToken)):
            return parts[0].reshape(self.shape)
        if isinstance(g, PerChannel):
            return parts[0].reshape(_moved_front(self.shape, g.axis)).movedim(0, g.axis)
        if isinstance(g, PerBlock):
            R, C = self.shape
            return parts[0].reshape(R // g.rows, C // g.cols, g.rows, g.cols).permute(0, 2, 1, 3).reshape(R, C)
        rows, n, full = self._group_dims()
        pieces = []
        if full:
            pieces.append(parts[0].reshape(rows, full * g.size))
        if n % g.size:
            pieces.append(parts[-1])
        xm = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        return xm.reshape(_moved(self.shape, g.axis)).movedim(-1, g.axis)

    # -- per-group statistics ------------------------------------------------
    def merge_stats(self, stats: list[torch.Tensor]) -> torch.Tensor:
        """One value per row of each part -> the natural stats shape."""
        if isinstance(self.g, PerGroup):
            rows, n, full = self._group_dims()
            cols = []
            if full:
                cols.append(stats[0].reshape(rows, full))
            if n % self.g.size:
                cols.append(stats[-1].reshape(rows, 1))
            return torch.cat(cols, dim=1).reshape(self.stats_shape)
        return stats[0].reshape(self.stats_shape)

    def split_stats(self, stats: torch.Tensor) -> list[torch.Tensor]:
        """Natural stats shape -> a column [G_i, 1] per part, to broadcast over it."""
        if isinstance(self.g, PerGroup):
            rows, n, full = self._group_dims()
            s = stats.reshape(rows, -1)
            out = [s[:, :full].reshape(-1, 1)] if full else []
            if n % self.g.size:
                out.append(s[:, full:].reshape(-1, 1))
            return out
        return [stats.reshape(-1, 1)]

    def _group_dims(self) -> tuple[int, int, int]:
        n = self.shape[self.g.axis]
        rows = math.prod(self.shape) // n if n else 0
        return rows, n, n // self.g.size


def _moved(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    axis %= len(shape)
    return shape[:axis] + shape[axis + 1:] + (shape[axis],)


def _moved_front(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    axis %= len(shape)
    return (shape[axis],) + shape[:axis] + shape[axis + 1:]
