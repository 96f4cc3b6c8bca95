"""A thread pool that runs at most ``allowed`` calls of one key at once; the rest wait
without a thread, lowest priority first.

Plain Python, no dask, no HTTP. :mod:`imgtasks.download` keys each fetch by its host's
limit (:mod:`imgtasks.hostlimits`): a URL whose host has no free slot waits here, in a
heap, not in a thread blocked on the host's lock. With one thread per waiting URL,
batches of 128 sent at once to one host kept ~512 threads alive in the I/O worker,
half of them waiting, and its memory grew x1.23 from 10k to 100k tiny images (thread
stacks); and a slow host's waiting URLs held threads that other hosts' URLs needed.

A waiting call that reaches its deadline is not run: its future gets ``expired(waited)``
instead, when :meth:`KeyedPool.expire` is called (the caller knows when its deadlines
fall).

The threads can be renewed (:class:`RenewedThreads`): each exits after ``retire_after``
calls, and a new one takes over the queue. glibc keeps up to 7 freed chunks of every size
up to 1 KiB per thread (tcache) and gives them back only when the thread exits; a thread
that lives for the whole run slowly fills its caches with the sizes it rarely needs.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)


class _State(Enum):
    WAITING = "waiting"
    STARTED = "started"  # handed to the pool's threads
    ENDED = "ended"  # expired or cancelled while waiting


@dataclass(order=True)
class Queued:
    """One call, waiting or handed to a thread; ``future`` gets its result."""

    priority: tuple[int, ...]
    arrival: int
    key: Hashable = field(compare=False)
    call: Callable[[float], Any] = field(compare=False, repr=False)  # given seconds waited
    expired: Callable[[float], Any] = field(compare=False, repr=False)
    deadline: float = field(compare=False)
    submitted: float = field(compare=False)
    future: Future[Any] = field(compare=False, default_factory=Future, repr=False)
    state: _State = field(compare=False, default=_State.WAITING)


@dataclass
class _Lane:
    """One key's calls: how many hold a thread, and the heap of those waiting."""

    allowed: Callable[[], int]
    running: int = 0
    live: int = 0  # entries of `waiting` still WAITING (the heap keeps ended ones until popped)
    waiting: list[Queued] = field(default_factory=list)


class RenewedThreads:
    """Up to ``max_threads`` threads run the calls handed to :meth:`submit`; a thread is
    started only when none is idle, and exits after ``retire_after`` calls (None: never),
    a fresh one taking over if calls are queued.

    Like ``ThreadPoolExecutor``, but a renewed thread hands its glibc caches back: in the
    I/O worker, renewing its download threads (500 calls) and its Dask task threads
    (:mod:`imgtasks.taskthreads`) kept glibc's bytes in use flat over 4 x 30,000 tiny URLs
    (20.23, 20.50, 20.46, 20.54 MiB) where they crept (21.99, 22.80, 23.38, 23.83);
    renewing only one of the two did not (``benchmarks/io_memory.py``, benchmarks/README).
    """

    def __init__(self, max_threads: int, name: str, *, retire_after: int | None = None) -> None:
        self._max = max_threads
        self._name = name
        self._retire_after = retire_after
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a call, less calls queued (< 0: calls wait)
        self._running: set[threading.Thread] = set()  # started, not yet ending
        self._names = itertools.count()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            self._calls.put((fn, args))
            if self._idle > 0 or len(self._running) >= self._max:
                self._idle -= 1  # an idle thread takes it, or it waits for one
            else:
                self._start_thread()

    def thread_count(self) -> int:
        return len(self._running)

    def shutdown(self, wait: bool = True) -> None:
        """End every thread once the calls queued before have run."""
        with self._lock:
            threads = list(self._running)
            for _ in threads:
                self._calls.put(None)
        for thread in threads if wait else ():
            thread.join()

    def _start_thread(self) -> None:  # inside the lock
        name = f"{self._name}_{next(self._names)}"
        thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._running.add(thread)
        thread.start()

    def _work(self) -> None:
        runs = 0
        while True:
            item = self._calls.get()
            if item is None:  # shutdown
                with self._lock:
                    self._running.discard(threading.current_thread())
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:  # a bug in the caller: say so, and keep the thread
                log.exception("a call on %s raised", threading.current_thread().name)
            del fn, args, item  # not held while idle
            runs += 1
            with self._lock:
                if self._retire_after is None or runs < self._retire_after:
                    self._idle += 1
                    continue
                self._running.discard(threading.current_thread())
                if self._idle < 0:  # calls are waiting: a fresh thread takes this one's place
                    self._idle += 1
                    self._start_thread()
                return


class KeyedPool:
    """``submit(key, allowed, call, ...)`` runs ``call(waited_s)`` on one of ``threads``
    threads once fewer than ``allowed()`` calls of ``key`` hold one. Thread-safe."""

    def __init__(
        self,
        threads: int,
        name: str,
        *,
        retire_after: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = RenewedThreads(threads, name, retire_after=retire_after)
        self._clock = clock
        self._lock = threading.Lock()
        self._lanes: dict[Hashable, _Lane] = {}
        self._arrivals = itertools.count()

    def submit(
        self,
        key: Hashable,
        allowed: Callable[[], int],
        call: Callable[[float], Any],
        *,
        expired: Callable[[float], Any],
        timeout: float,
        priority: tuple[int, ...] = (),
    ) -> Queued:
        """Queue ``call``; it runs now if ``key`` has a free slot. ``allowed`` is read
        again each time a slot may have opened (a limit that moves)."""
        now = self._clock()
        entry = Queued(priority, next(self._arrivals), key, call, expired, now + timeout, now)
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = _Lane(allowed)
            lane.allowed = allowed
            heapq.heappush(lane.waiting, entry)
            lane.live += 1
            starts = self._ready(lane)
        self._start(starts, now)
        return entry

    def expire(self, entries: list[Queued]) -> float:
        """End those of ``entries`` still waiting past their deadline with ``expired``;
        return the next deadline among those still waiting (inf: none)."""
        now = self._clock()
        ended, next_deadline = [], float("inf")
        with self._lock:
            for entry in entries:
                if entry.state is not _State.WAITING:
                    continue
                if entry.deadline > now:
                    next_deadline = min(next_deadline, entry.deadline)
                    continue
                entry.state = _State.ENDED
                lane = self._lanes[entry.key]
                lane.live -= 1
                self._forget_if_idle(entry.key, lane)
                ended.append(entry)
        for entry in ended:
            if entry.future.set_running_or_notify_cancel():
                entry.future.set_result(entry.expired(now - entry.submitted))
        return next_deadline

    def waiting(self) -> int:
        """Calls waiting for a slot of their key (for tests and reports)."""
        with self._lock:
            return sum(lane.live for lane in self._lanes.values())

    def thread_count(self) -> int:
        return self._pool.thread_count()

    # -- inside the lock

    def _ready(self, lane: _Lane) -> list[Queued]:
        """Pop the entries that may start now (their lane has slots), lowest first."""
        starts = []
        while lane.waiting and lane.running < lane.allowed():
            entry = heapq.heappop(lane.waiting)
            if entry.state is not _State.WAITING:
                continue
            lane.live -= 1
            if entry.future.cancelled():
                entry.state = _State.ENDED
                continue
            entry.state = _State.STARTED
            lane.running += 1
            starts.append(entry)
        return starts

    def _forget_if_idle(self, key: Hashable, lane: _Lane) -> None:
        if not lane.running and not lane.live:
            del self._lanes[key]

    # -- outside the lock

    def _start(self, entries: list[Queued], now: float) -> None:
        for entry in entries:
            self._pool.submit(self._run, entry, now - entry.submitted)

    def _run(self, entry: Queued, waited: float) -> None:
        if not entry.future.set_running_or_notify_cancel():
            self._finished(entry.key)
            return
        try:
            result = entry.call(waited)
        except BaseException as exc:
            self._finished(entry.key)
            entry.future.set_exception(exc)
        else:
            self._finished(entry.key)  # the next call of this key starts before we report
            entry.future.set_result(result)

    def _finished(self, key: Hashable) -> None:
        with self._lock:
            lane = self._lanes[key]
            lane.running -= 1
            starts = self._ready(lane)
            self._forget_if_idle(key, lane)
        self._start(starts, self._clock())
