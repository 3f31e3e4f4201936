"""Wall time by phase of a long job, for its report (the calibration runner's CalibrationReport.phases).

    clock = PhaseClock()
    with clock.running("other"):          # this thread's time goes to clock; unnamed time is "other"
        with phase("forwards"):
            with phase("hessians"): ...   # nested: counted as hessians, not also as forwards
    clock.seconds                         # {"forwards": 1.2, "hessians": 0.4, "other": 0.01}

Each phase counts its own (exclusive) time, so the phases of one thread sum to the time it ran.
`phase` costs one clock read outside any running clock, so methods can mark their phases unconditionally.
Work spread over threads (the layer solves) runs under a clock of its own, which `absorb` folds into
the parent's as shares of the wall time the threads took together.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from typing import Iterator

_local = threading.local()


class PhaseClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    @contextlib.contextmanager
    def running(self, name: str = "other") -> Iterator["PhaseClock"]:
        """Count this thread's phases on this clock while inside; time in no named phase is `name`."""
        saved = getattr(_local, "frames", None)
        _local.frames = [_Frame(self, name)]
        try:
            yield self
        finally:
            _local.frames[0].close()
            _local.frames = saved

    def absorb(self, other: "PhaseClock", wall: float) -> None:
        """Add `other`'s phases (thread-seconds of work that ran in parallel and took `wall` seconds) as
        their shares of `wall`, and take `wall` out of the calling thread's current phase."""
        total = other.total
        for name, s in other.seconds.items():
            self.add(name, wall * s / total if total > 0 else 0.0)
        frames = getattr(_local, "frames", None)
        if frames:
            frames[-1].inner += wall


class _Frame:
    def __init__(self, clock: PhaseClock, name: str):
        self.clock, self.name, self.start, self.inner = clock, name, time.perf_counter(), 0.0

    def close(self) -> float:
        elapsed = time.perf_counter() - self.start
        self.clock.add(self.name, elapsed - self.inner)
        return elapsed


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the time inside as phase `name` of the clock this thread runs under (none: nothing counted)."""
    frames = getattr(_local, "frames", None)
    if not frames:
        yield
        return
    frame = _Frame(frames[-1].clock, name)
    frames.append(frame)
    try:
        yield
    finally:
        frames.pop()
        frames[-1].inner += frame.close()
