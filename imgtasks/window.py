"""How many batches the client keeps in flight, sized by measurement: plain Python, no dask.

Little's law: to keep the CPU pool busy, the batches being downloaded must be about the
pool's throughput times the download time of a batch. :class:`Window` measures both from
the finished batches' reports (the CPU time a batch takes, the network time of its URLs,
waits for a host's slot excluded) and keeps

    in flight = 2 x CPU slots (one batch in each slot, one waiting for it)
              + CPU throughput (batches/s) x download time of a batch x HEADROOM
              + a correction learnt from how busy the CPU pool really is

The correction grows while the pool is under-used with the window full (the formula
missed something: an I/O worker short of CPU, slow bodies) and shrinks while the pool is
saturated and downloaded batches wait for it (the CPU pool is the bottleneck: more in
flight would only hold more bytes). The window never exceeds the memory budget
(``max_bytes`` over the measured bytes of a batch) nor what the I/O pool can download at
once. Before the first reports it is ``start``; ``fixed`` (``--window N``) overrides it all.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEFAULT_MAX_INFLIGHT_BYTES = 512 * 2**20
HEADROOM = 1.5  # latency varies from batch to batch: downloads ahead of need, not just in time
WEIGHT = 0.2  # exponentially weighted means: about the last five batches
UNDER_USED = 0.8  # CPU busy fraction below which the window grows past the formula
SATURATED = 0.95  # above which, with batches waiting for the CPU, it shrinks


@dataclass(frozen=True)
class Finished:
    """What the window needs from one finished batch (fields of a BatchReport)."""

    entries: int
    fetched: int  # URLs downloaded (not resumed, not invalid)
    download_s: float  # network time summed over its URLs
    download_wall_s: float
    thumbnail_wall_s: float
    bytes_in: int
    turnaround_s: float  # from submission to its report
    thumbnail_cpu_s: float  # the thumbnail node's own CPU time (its wall counts waits too)


@dataclass
class Window:
    cpu_slots: int
    io_slots: int
    start: int
    fixed: int | None = None
    max_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    clock: Callable[[], float] = time.monotonic
    _cpu_s: float | None = None  # CPU wall per batch
    _download_s: float | None = None  # download wall per batch, host queueing excluded
    _bytes: float | None = None  # bytes per batch
    _extra: float = 0.0
    _recent: deque[tuple[float, Finished]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max in-flight bytes must be >= 1, got {self.max_bytes}")
        self.cpu_slots = max(1, self.cpu_slots)
        self.io_slots = max(1, self.io_slots)

    def observe(self, done: Finished, in_flight: int) -> None:
        """A batch finished; ``in_flight``: batches still out (the window's use)."""
        if done.entries == 0:
            return
        now = self.clock()
        self._recent.append((now, done))
        while len(self._recent) > 4 * self.cpu_slots + 4:
            self._recent.popleft()
        self._cpu_s = _mean(self._cpu_s, done.thumbnail_wall_s)
        self._bytes = _mean(self._bytes, done.bytes_in)
        if done.fetched:
            # Per URL network time, as if the batch's URLs went in one wave: the time a
            # download node takes when no host makes it queue.
            per_url = done.download_s / done.fetched
            self._download_s = _mean(self._download_s, min(done.download_wall_s, 2 * per_url))
        self._correct(in_flight)

    def target(self) -> int:
        """Batches to keep in flight now."""
        if self.fixed:
            return self.fixed
        if self._cpu_s is None:
            return self.start
        return max(self.floor, min(self.ceiling, round(self.little() + self._extra)))

    def little(self, headroom: float = HEADROOM) -> float:
        cpu_batches_per_s = self.cpu_slots / max(self._cpu_s or 0.0, 1e-3)
        downloading = cpu_batches_per_s * (self._download_s or 0.0) * headroom
        return 2 * self.cpu_slots + math.ceil(downloading)

    @property
    def floor(self) -> int:
        return self.cpu_slots + 1

    @property
    def ceiling(self) -> int:
        by_pools = self.io_slots + 2 * self.cpu_slots
        by_memory = int(self.max_bytes / max(self._bytes or 1.0, 1.0))
        return max(self.floor, min(by_pools, by_memory))

    def busy(self) -> float | None:
        """The CPU pool's busy fraction over the recent batches (None: too few yet)."""
        if len(self._recent) < 2:
            return None
        span = self._recent[-1][0] - self._recent[0][0]
        if span <= 0:
            return None
        work = sum(done.thumbnail_wall_s for _, done in list(self._recent)[1:])
        return min(1.0, work / (self.cpu_slots * span))

    def _correct(self, in_flight: int) -> None:
        busy = self.busy()
        if busy is None:
            return
        last = self._recent[-1][1]
        waited = last.turnaround_s - last.download_wall_s - last.thumbnail_wall_s
        full = in_flight + 1 >= self.target()
        if busy < UNDER_USED and full:
            self._extra = min(self._extra + 1.0, float(self.ceiling))
        elif busy > SATURATED and waited > last.thumbnail_wall_s:
            # Shrink by the headroom at most: below Little's law itself a CPU slot that
            # finishes may find no downloaded batch waiting (at the floor, CPU slots + 1,
            # one batch downloads while both slots work).
            self._extra = max(self._extra - 1.0, self.little(1.0) - self.little())
        log.debug(
            "window %d (Little %d, extra %+.0f), %d in flight, CPU pool busy %.2f",
            self.target(),
            self.little(),
            self._extra,
            in_flight,
            busy,
        )


# Batch sizes chosen by measurement (``BatchSizing``): measured on 3000 web-size images,
# 2 cores, the flow spent 4.95-5.29 ms of CPU per image in batches of 16 and 4.12-4.29 ms
# in batches of 64, 7.2-7.5 s instead of 8.4-8.9 s: each batch costs the scheduler, the
# client and the workers' event loops ~15 ms of CPU whatever its size. Batches of photos
# stay small: 16 photos are already ~0.5 s of work, and a big last batch would keep one
# CPU slot busy while the others wait.
BATCH_START = 16
BATCH_CEILING = 128
# Thumbnail work per batch, in the node's CPU seconds. It was wall seconds until
# 2026-12-01: on 2 cores the thumbnail nodes share them with the I/O worker, the client and
# the scheduler, so a node's wall was 2-3x its CPU and web-size batches stopped at 25-45
# URLs, whose per-batch overhead loaded the cores further. Sized by CPU they grow to
# 45-100 (3000 web-size images, 4 interleaved pairs: 55-64 batches instead of 78-111,
# median 23.5 CPU-s and 14.0 s instead of 26.2 CPU-s and 15.3 s).
BATCH_TARGET_S = 0.25
# CPU per URL is the median of the last batches': a worker's first batch costs ~0.5 s
# more (first decoders, first manifest part: 15.7 ms per web-size URL instead of 2-4 ms,
# measured), and a mean took a dozen batches to forget one per worker.
SIZING_BATCHES = 9


@dataclass
class BatchSizing:
    """URLs per batch, sized by measurement: ``start`` until batches come back, then
    enough for ``target_s`` of thumbnail CPU time (the measured CPU per downloaded URL),
    at most doubling from one batch to the next, between ``start`` and ``ceiling``.

    Called with no argument it is the size of the next batch (what ``sources.batched``
    asks at each batch it starts)."""

    start: int = BATCH_START
    ceiling: int = BATCH_CEILING
    target_s: float = BATCH_TARGET_S
    _per_url: deque[float] = field(default_factory=lambda: deque(maxlen=SIZING_BATCHES))
    _size: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.ceiling:
            raise ValueError(f"need 1 <= start <= ceiling, got {self.start}, {self.ceiling}")
        self._size = self.start

    def __call__(self) -> int:
        return self._size

    def observe(self, done: Finished) -> None:
        if done.fetched == 0:
            return
        self._per_url.append(done.thumbnail_cpu_s / done.fetched)
        wanted = round(self.target_s / max(statistics.median(self._per_url), 1e-6))
        self._size = max(self.start, min(self.ceiling, wanted, 2 * self._size))


def _mean(old: float | None, new: float) -> float:
    return new if old is None else old + WEIGHT * (new - old)
