"""How loaded a demo host is: requests in flight, what each arrival saw, and a "fragile host"
that answers 429 (or slows down) once more than K requests are in flight at once.

What the adaptive per-host limit (:mod:`imgtasks.hostlimits`) is tested against: the host
itself counts what reaches it, whatever processes the requests came from.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

LOAD_LOG_SIZE = 200_000


@dataclass(frozen=True)
class Fragility:
    """A host that copes with ``above`` requests in flight and no more.

    Beyond that it answers 429 (with ``Retry-After: retry_after`` when set), or, when
    ``slowdown`` > 0, serves anyway but ``slowdown`` seconds later per request over the
    limit (a host that slows down instead of refusing).
    """

    above: int
    retry_after: float | None = None
    slowdown: float = 0.0

    def __post_init__(self) -> None:
        if self.above < 1:
            raise ValueError(f"a fragile host copes with at least 1 request, got {self.above}")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        if self.slowdown < 0:
            raise ValueError("slowdown must be >= 0")


class Load:
    """Requests in flight on one host; thread-safe (handlers run on the server's loop,
    tests read from theirs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.refused = 0  # 429s sent for being over the limit
        # (monotonic time, requests in flight including this one) at every arrival
        self._log: deque[tuple[float, int]] = deque(maxlen=LOAD_LOG_SIZE)

    def enter(self) -> int:
        """A request arrived; returns how many are in flight now, itself included."""
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self._log.append((time.monotonic(), self.in_flight))
            return self.in_flight

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def refuse(self) -> None:
        with self._lock:
            self.refused += 1

    def log(self) -> list[tuple[float, int]]:
        with self._lock:
            return list(self._log)

    def figures(self) -> dict[str, object]:
        """What ``/load`` answers: now, the peak, the 429s, and the arrivals' log."""
        with self._lock:
            return {
                "in_flight": self.in_flight,
                "peak": self.peak,
                "refused": self.refused,
                "log": list(self._log),
            }

    def reset(self) -> None:
        with self._lock:
            self.peak = self.in_flight
            self.refused = 0
            self._log.clear()
