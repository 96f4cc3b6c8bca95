"""KeyedPool: at most `allowed` calls of a key hold a thread; the rest wait in priority
order, without a thread, until a slot opens or their deadline passes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from imgtasks.keyedpool import KeyedPool, RenewedThreads

TIMEOUT = 10.0


@pytest.fixture
def pool() -> Iterator[KeyedPool]:
    pool = KeyedPool(16, "test-keyed")
    yield pool
    pool._pool.shutdown(wait=True)


class Gate:
    """Calls that block until opened, recording the order they started in."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.started: list[str] = []
        self.lock = threading.Lock()

    def call(self, name: str) -> Callable[[float], tuple[str, float]]:
        def run(waited: float) -> tuple[str, float]:
            with self.lock:
                self.started.append(name)
            assert self.open.wait(TIMEOUT)
            return name, waited

        return run


def never_expired(waited: float) -> str:
    raise AssertionError("expired")


def test_at_most_allowed_calls_of_a_key_hold_a_thread(pool: KeyedPool) -> None:
    gate = Gate()
    entries = [
        pool.submit("a", lambda: 2, gate.call(f"a{i}"), expired=never_expired, timeout=TIMEOUT)
        for i in range(10)
    ]
    other = pool.submit("b", lambda: 2, lambda waited: "b", expired=never_expired, timeout=TIMEOUT)
    assert other.future.result(TIMEOUT) == "b"  # another key is not held up by a's queue
    assert pool.waiting() == 8
    assert pool.thread_count() <= 3  # a's two, and the one b used (reused or its own)
    gate.open.set()
    assert [e.future.result(TIMEOUT)[0] for e in entries] == [f"a{i}" for i in range(10)]
    assert pool.waiting() == 0 and not pool._lanes  # every lane forgotten once idle


def test_waiting_calls_start_lowest_priority_first(pool: KeyedPool) -> None:
    gate = Gate()
    first = pool.submit("a", lambda: 1, gate.call("first"), expired=never_expired, timeout=TIMEOUT)
    later = [
        pool.submit(
            "a",
            lambda: 1,
            gate.call(f"p{p}"),
            expired=never_expired,
            timeout=TIMEOUT,
            priority=(p,),
        )
        for p in (3, 1, 2)
    ]
    gate.open.set()
    for entry in [first, *later]:
        entry.future.result(TIMEOUT)
    assert gate.started == ["first", "p1", "p2", "p3"]


def test_a_limit_that_grows_lets_more_start(pool: KeyedPool) -> None:
    allowed = [1]
    gate = Gate()
    entries = [
        pool.submit(
            "a", lambda: allowed[0], gate.call(f"a{i}"), expired=never_expired, timeout=TIMEOUT
        )
        for i in range(4)
    ]
    assert pool.waiting() == 3
    allowed[0] = 3  # read again when the running call ends
    gate.open.set()
    assert [e.future.result(TIMEOUT)[0] for e in entries] == ["a0", "a1", "a2", "a3"]


def test_a_call_past_its_deadline_expires_without_running(pool: KeyedPool) -> None:
    gate = Gate()
    running = pool.submit("a", lambda: 1, gate.call("run"), expired=never_expired, timeout=TIMEOUT)
    late = pool.submit(
        "a", lambda: 1, gate.call("late"), expired=lambda waited: ("expired", waited), timeout=0.05
    )
    assert pool.expire([running, late]) == pytest.approx(late.deadline)  # not yet
    threading.Event().wait(0.1)
    assert pool.expire([running, late]) == float("inf")  # none left waiting
    status, waited = late.future.result(0)
    assert status == "expired" and waited >= 0.05
    gate.open.set()
    assert running.future.result(TIMEOUT)[0] == "run"
    assert gate.started == ["run"]  # the expired call never ran


def test_cancelled_calls_are_skipped_and_the_key_still_runs(pool: KeyedPool) -> None:
    gate = Gate()
    running = pool.submit("a", lambda: 1, gate.call("run"), expired=never_expired, timeout=TIMEOUT)
    cancelled = pool.submit("a", lambda: 1, gate.call("no"), expired=never_expired, timeout=TIMEOUT)
    assert cancelled.future.cancel()
    gate.open.set()
    running.future.result(TIMEOUT)
    after = pool.submit("a", lambda: 1, gate.call("after"), expired=never_expired, timeout=TIMEOUT)
    assert after.future.result(TIMEOUT)[0] == "after"
    assert gate.started == ["run", "after"]


def test_an_exception_reaches_the_future_and_frees_the_slot(pool: KeyedPool) -> None:
    def boom(waited: float) -> None:
        raise RuntimeError("boom")

    failed = pool.submit("a", lambda: 1, boom, expired=never_expired, timeout=TIMEOUT)
    fine = pool.submit(
        "a", lambda: 1, lambda waited: "fine", expired=never_expired, timeout=TIMEOUT
    )
    with pytest.raises(RuntimeError, match="boom"):
        failed.future.result(TIMEOUT)
    assert fine.future.result(TIMEOUT) == "fine"


def test_threads_are_renewed_after_retire_after_calls() -> None:
    """Each thread runs at most ``retire_after`` calls, then a fresh one takes over: every
    call still runs, in at most ``threads`` threads at once."""
    pool = KeyedPool(4, "test-renewed", retire_after=3)
    gate = Gate()
    entries = [
        pool.submit(i % 5, lambda: 2, gate.call(str(i)), expired=never_expired, timeout=TIMEOUT)
        for i in range(30)
    ]
    names: list[str] = []

    def named(waited: float) -> str:
        return threading.current_thread().name

    assert pool.thread_count() == 4  # all busy behind the gate, the rest queued
    gate.open.set()
    assert sorted(e.future.result(TIMEOUT)[0] for e in entries) == sorted(map(str, range(30)))
    for _ in range(12):
        names.append(
            pool.submit(
                "n", lambda: 1, named, expired=never_expired, timeout=TIMEOUT
            ).future.result(TIMEOUT)
        )
    assert max(names.count(n) for n in names) <= 3, names
    assert len(set(names)) >= 4, names
    assert pool.thread_count() <= 4
    pool._pool.shutdown(wait=True)
    assert pool.thread_count() == 0


def test_a_call_that_raises_is_logged_and_its_thread_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    threads = RenewedThreads(1, "test-raise")
    done = threading.Event()

    def broken() -> None:
        raise RuntimeError("a bug")

    with caplog.at_level("ERROR", logger="imgtasks.keyedpool"):
        threads.submit(broken)
        threads.submit(done.set)
        assert done.wait(TIMEOUT)
    assert threads.thread_count() == 1
    assert any("raised" in r.getMessage() and r.exc_info for r in caplog.records)
    threads.shutdown()
