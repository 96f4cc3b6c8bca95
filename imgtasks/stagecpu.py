"""Per-process CPU counters of the stages: how much of a process's CPU went to each step.

``benchmarks/cpu_breakdown.py`` reads them from every worker to say where a run's CPU went
(make_thumbnail, hashing, file writes, manifest parts, the HTTP work of each fetch...).
Each count reads the calling thread's CPU clock twice: ~1 µs, against ~3 ms of work per
image. No dask here: the stage modules and the nodes use it.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

_lock = threading.Lock()
_totals: dict[str, list[float]] = {}  # name -> [CPU seconds, calls]


class counted:
    """Add the calling thread's CPU time inside the block to the counter ``name``."""

    __slots__ = ("name", "start")

    def __init__(self, name: str) -> None:
        self.name = name
        self.start = 0.0

    def __enter__(self) -> None:
        self.start = time.thread_time()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        add(self.name, time.thread_time() - self.start)


def add(name: str, cpu_s: float, calls: int = 1) -> None:
    with _lock:
        total = _totals.setdefault(name, [0.0, 0])
        total[0] += cpu_s
        total[1] += calls


def snapshot() -> dict[str, tuple[float, int]]:
    """Every counter of this process: name -> (CPU seconds, calls)."""
    with _lock:
        return {name: (cpu, int(calls)) for name, (cpu, calls) in _totals.items()}


def reset() -> None:
    with _lock:
        _totals.clear()
