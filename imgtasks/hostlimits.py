"""How many requests to one host may be in flight at once, per worker process: a limit that
finds each host's pace (AIMD, as TCP finds a link's), or a fixed cap.

Plain Python, no dask, no HTTP; :mod:`imgtasks.download` holds one :class:`HostLimit` per
host and tells it how each request went.

- **Grow while healthy.** A host starts at ``start`` concurrent requests. While its answers
  stay healthy (no 429/503, no time-outs or resets, latency not climbing) and the limit is
  what holds requests back (every slot was taken, by requests or with one waiting, within
  the last two round trips: TCP's "cwnd-limited" rule, RFC 7661), every answer adds one
  (slow start: the limit doubles per round trip) until the first sign of trouble; after
  that, one per round trip (each answer adds ``1 / limit``), and an eighth of that near
  the level where the host last complained.
  Never above ``ceiling``.
- **Shrink quickly.** A 429 or 503, a time-out or reset halves the limit; a latency climb
  (recent time to first byte over twice the host's best, plus 50 ms) takes a fifth off.
  Only answers to requests sent after the last cut halve it again: a burst of 429s
  caused by one too-large limit halves it once, not once per answer; but when the
  burst's refusals R show the host copes with fewer than half of the L it allowed, the
  limit goes to L - R.
- **Retry-After.** No new request starts to that host until it has passed (capped).
- **Slots go in order.** Requests waiting for a slot get it lowest ``priority`` first (the
  downloader passes its batch's order and the URL's place in it): the first batch finishes
  first, instead of every batch in flight getting some of its URLs through and all of
  them finishing together, one round trip per wave, while the CPU pool waits.
- Limits are per worker process: P I/O processes crawling one host each find their own
  limit, and the host sees the sum (each process backs off on the host's own signals).

``HostLimit(ceiling, adaptive=False)`` is the fixed cap of earlier versions: signals are
ignored, ``ceiling`` requests at once, no pause.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

# Shrink factors: multiplicative decrease, as TCP Reno's halving on loss.
OVERLOAD_FACTOR = 0.5  # 429, 503, time-out, reset
LATENCY_FACTOR = 0.8  # the host answers slower and slower: back off gently
# A latency climb: the recent time to first byte above SLOWER x the host's best + SLACK_S.
SLOWER = 2.0
SLACK_S = 0.05
RECENT_WEIGHT = 0.2  # exponentially weighted latency: about the last five answers
BEST_DRIFT = 1.002  # the best latency is forgotten slowly (x1.002 per answer: ~350 answers to x2)
NEAR_BAD_SLOWDOWN = 8.0  # probing within one of the last complaint's level goes 8x slower
RETRY_AFTER_MAX_S = 60.0
# How long reaching the limit counts towards growing: two round trips (the answers to a
# burst that hit the limit come one round trip later), or this before any is measured.
# Four round trips let 16 hosts at 1 s grow to ~80 with 30 ever in flight.
LIMITED_MEMORY_S = 1.0
LIMITED_MEMORY_ROUND_TRIPS = 2.0


@dataclass(frozen=True)
class Ticket:
    """One request's hold on a host slot: when it was let in (to ignore stale signals)
    and the limit then (a cut halves the limit that caused the overload, not one grown
    since by answers that raced the complaint)."""

    started: float
    limit: float = float("inf")


@dataclass(order=True)
class _Waiter:
    """A request waiting for a slot: served lowest ``priority`` first, then in arrival order.
    Each has its own condition on the host's lock, so a freed slot wakes one thread."""

    priority: tuple[int, ...]
    arrival: int
    wake: threading.Condition = field(compare=False)


@dataclass(frozen=True)
class Snapshot:
    """A host's state, for reports and tests."""

    limit: float
    in_flight: int
    peak_in_flight: int
    cuts: int
    best_latency_s: float | None
    recent_latency_s: float | None
    waiting: int = 0  # requests waiting for a slot


class HostLimit:
    """The concurrency limit of one host; thread-safe. ``clock`` is injectable for tests."""

    def __init__(
        self,
        ceiling: int,
        start: int | None = None,
        *,
        adaptive: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1, got {ceiling}")
        self.ceiling = ceiling
        self.adaptive = adaptive
        self.limit = float(min(start or ceiling, ceiling) if adaptive else ceiling)
        self.in_flight = 0
        self.peak_in_flight = 0
        self.cuts = 0
        self._clock = clock
        self._slow_start = True
        self._bad_level: float | None = None  # where the host last complained
        self._last_cut = float("-inf")
        # The last overload cut: (the cut before it, the limit it cut, refusals since)
        self._burst = (float("-inf"), float("inf"), 0)
        self._paused_until = float("-inf")
        self._best: float | None = None
        self._recent: float | None = None
        self._limited_at = float("-inf")  # when the limit last held a request back
        self._lock = threading.Lock()
        self._waiters: list[_Waiter] = []  # a heap
        self._arrivals = itertools.count()

    # -- slots

    def acquire(self, timeout: float, priority: tuple[int, ...] = ()) -> Ticket | None:
        """Wait up to ``timeout`` seconds for a slot; None when none came in time. Waiting
        requests are let in lowest ``priority`` first."""
        deadline = self._clock() + max(timeout, 0.0)
        with self._lock:
            queue = self._waiters or not self._open(self._clock())
            if queue and not self._wait_turn(priority, deadline):
                return None
            now = self._clock()
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self._note_if_full(now)
            self._wake_next()  # a slot may still be free: the next in line checks
            return Ticket(now, self.limit)

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            self.in_flight -= 1
            self._wake_next()

    @property
    def allowed(self) -> int:
        """Requests that may be in flight now."""
        return max(1, int(self.limit))

    # -- signals

    def answered(self, ticket: Ticket, latency_s: float | None) -> None:
        """A healthy answer; ``latency_s``: its time to first byte (None: not measured)."""
        if not self.adaptive:
            return
        with self._lock:
            if latency_s is not None and self._latency_climbed(latency_s):
                self._cut(ticket, LATENCY_FACTOR)
                return
            # Grow only while the limit holds requests back: a host asked twice at a time
            # says nothing about whether it copes with 100, and a limit above the demand
            # only means more connections when a burst comes.
            if not self._limited():
                return
            self._grow()
            self._wake_next()

    def overloaded(self, ticket: Ticket, retry_after_s: float | None = None) -> None:
        """A 429 or 503 (with its Retry-After, seconds), or a time-out or reset."""
        if not self.adaptive:
            return
        with self._lock:
            if retry_after_s is not None and retry_after_s > 0:
                pause = min(retry_after_s, RETRY_AFTER_MAX_S)
                self._paused_until = max(self._paused_until, self._clock() + pause)
            if ticket.started < self._last_cut:
                self._refused_in_burst(ticket)
            else:
                since = self._last_cut
                self._cut(ticket, OVERLOAD_FACTOR)
                self._burst = (since, self._bad_level or self.limit, 1)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                self.limit,
                self.in_flight,
                self.peak_in_flight,
                self.cuts,
                self._best,
                self._recent,
                len(self._waiters),
            )

    # -- inside the lock

    def _open(self, now: float) -> bool:
        """A new request may start now: no Retry-After pause, a slot free."""
        return now >= self._paused_until and self.in_flight < self.allowed

    def _wait_turn(self, priority: tuple[int, ...], deadline: float) -> bool:
        """Queue, and wait until first in line with a slot open; False at the deadline."""
        waiter = _Waiter(priority, next(self._arrivals), threading.Condition(self._lock))
        heapq.heappush(self._waiters, waiter)
        try:
            while True:
                now = self._clock()
                if self._waiters[0] is waiter and self._open(now):
                    return True
                self._note_if_full(now)  # not for a pause, nor a turn yet to be taken
                left = deadline - now
                if left <= 0:
                    return False
                pause = self._paused_until - now
                waiter.wake.wait(min(left, pause) if pause > 0 else left)
        finally:
            if self._waiters[0] is waiter:
                heapq.heappop(self._waiters)
            else:  # timed out (or interrupted) in the middle of the line
                self._waiters.remove(waiter)
                heapq.heapify(self._waiters)
            self._wake_next()

    def _wake_next(self) -> None:
        if self._waiters:
            self._waiters[0].wake.notify()

    def _grow(self) -> None:
        if self._slow_start:
            step = 1.0
        else:
            step = 1.0 / self.limit
            if self._bad_level is not None and self.limit + 1 >= self._bad_level:
                step /= NEAR_BAD_SLOWDOWN
        self.limit = min(float(self.ceiling), self.limit + step)
        if self._bad_level is not None and self.limit > self._bad_level + 1:
            self._bad_level = None  # it copes well above where it complained: forget that

    def _cut(self, ticket: Ticket, factor: float) -> None:
        if ticket.started < self._last_cut:
            return  # sent under the old, larger limit: already answered for
        self._bad_level = min(self.limit, ticket.limit)
        self.limit = max(1.0, self._bad_level * factor)
        self._slow_start = False
        self._last_cut = self._clock()
        self.cuts += 1
        self._recent = self._best  # judge the new level by answers at the new level

    def _refused_in_burst(self, ticket: Ticket) -> None:
        """Another refusal of the burst already cut for: not a second halving, but the
        host has now refused R of the L requests that burst allowed, so it copes with at
        most L - R. A host that copes with 4 and is sent 16 at once refuses 12: the limit
        goes to 4 at once, not to 8 and then a second burst of refusals."""
        since, allowed, refused = self._burst
        if ticket.started < since:  # sent before an older cut: already answered for
            return
        refused += 1
        self._burst = (since, allowed, refused)
        self.limit = max(1.0, min(self.limit, allowed - refused))

    def _note_if_full(self, now: float) -> None:
        """Every slot is taken: the limit is what holds requests back now."""
        if self.in_flight >= self.allowed:
            self._limited_at = now

    def _limited(self) -> bool:
        """Every slot was taken (a request may have waited) within the last two round trips."""
        recent = self._recent
        memory = LIMITED_MEMORY_S if recent is None else LIMITED_MEMORY_ROUND_TRIPS * recent
        return self._clock() - self._limited_at <= memory

    def _latency_climbed(self, latency_s: float) -> bool:
        best = latency_s if self._best is None else min(latency_s, self._best * BEST_DRIFT)
        self._best = best
        recent = self._recent
        recent = latency_s if recent is None else recent + RECENT_WEIGHT * (latency_s - recent)
        self._recent = recent
        return recent > SLOWER * best + SLACK_S


class HostLimits:
    """One :class:`HostLimit` per host (any hashable key), made on first use. Bounded: past
    ``size`` hosts, the idle ones are forgotten (they start again from ``start``)."""

    SIZE = 65_536

    def __init__(
        self,
        ceiling: int,
        start: int | None = None,
        *,
        adaptive: bool = True,
        size: int = SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ceiling, self.start, self.adaptive = ceiling, start, adaptive
        self.size = size
        self._clock = clock
        self._limits: dict[Hashable, HostLimit] = {}
        self._lock = threading.Lock()

    def get(self, host: Hashable) -> HostLimit:
        limit = self._limits.get(host)
        if limit is not None:
            return limit
        with self._lock:
            if len(self._limits) >= self.size:
                self._limits = {k: v for k, v in self._limits.items() if v.in_flight}
            return self._limits.setdefault(
                host, HostLimit(self.ceiling, self.start, adaptive=self.adaptive, clock=self._clock)
            )

    def peek(self, host: Hashable) -> Snapshot | None:
        """One host's state now; None for a host not (or no longer) known."""
        limit = self._limits.get(host)
        return None if limit is None else limit.snapshot()

    def snapshot(self) -> dict[Hashable, Snapshot]:
        """Every host's state now."""
        with self._lock:
            limits = dict(self._limits)
        return {host: limit.snapshot() for host, limit in limits.items()}
