"""The adaptive per-host limit on its own, with a fake clock (threads only where requests
wait for a slot); no network."""

from __future__ import annotations

import threading

import pytest

from imgtasks.hostlimits import HostLimit, HostLimits, Ticket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def round_trip(limit: HostLimit, clock: Clock, latency: float = 0.5) -> list[Ticket]:
    """Fill every slot, let time pass, answer them all healthily."""
    tickets = []
    while (ticket := limit.acquire(0)) is not None:
        tickets.append(ticket)
    clock.now += latency
    for ticket in tickets:
        limit.answered(ticket, latency)
        limit.release(ticket)
    return tickets


def test_a_healthy_host_doubles_per_round_trip_up_to_the_ceiling() -> None:
    clock = Clock()
    limit = HostLimit(128, 8, clock=clock)
    sent = [len(round_trip(limit, clock)) for _ in range(6)]
    assert sent == [8, 16, 32, 64, 128, 128]
    assert limit.limit == 128


def test_an_overload_halves_once_per_burst_and_pauses_for_retry_after() -> None:
    clock = Clock()
    limit = HostLimit(128, 32, clock=clock)
    tickets = [limit.acquire(0) for _ in range(32)]
    clock.now += 0.1
    for ticket in tickets[:10]:  # ten 429s from one too-large limit: one cut
        limit.overloaded(ticket, retry_after_s=2.0)
    assert limit.limit == 16
    assert limit.cuts == 1
    for ticket in tickets:
        limit.release(ticket)
    assert limit.acquire(0) is None  # Retry-After: nothing new for 2 s
    clock.now += 2.0
    fresh = limit.acquire(0)
    assert fresh is not None
    limit.overloaded(fresh)  # a request sent after the cut counts again
    assert limit.limit == 8
    assert limit.cuts == 2


def test_after_a_cut_growth_is_one_per_round_trip_and_slower_near_the_complaint() -> None:
    clock = Clock()
    limit = HostLimit(128, 16, clock=clock)
    ticket = limit.acquire(0)
    clock.now += 0.1
    limit.overloaded(ticket)
    limit.release(ticket)
    assert limit.limit == 8
    round_trip(limit, clock)
    assert limit.limit == pytest.approx(9, abs=0.1)  # additive: about +1 per round trip
    for _ in range(5):
        round_trip(limit, clock)
    assert 13 < limit.limit < 14
    for _ in range(4):
        round_trip(limit, clock)
    assert 15 < limit.limit < 15.5  # within one of 16, probing an eighth as fast


def test_a_host_that_breaks_above_k_settles_near_k() -> None:
    """A simulated host answering 429 to every request beyond 4 in flight."""
    clock = Clock()
    limit = HostLimit(128, 8, clock=clock)
    overloads = 0
    for _ in range(200):
        tickets = []
        while (ticket := limit.acquire(0)) is not None:
            tickets.append(ticket)
        clock.now += 0.2
        for i, ticket in enumerate(tickets):
            if i >= 4:
                overloads += 1
                limit.overloaded(ticket)
            else:
                limit.answered(ticket, 0.2)
            limit.release(ticket)
    assert limit.allowed <= 5
    assert overloads < 0.05 * 200 * 4  # a probe now and then, not every round trip


def test_a_latency_climb_backs_off() -> None:
    clock = Clock()
    limit = HostLimit(128, 16, clock=clock)
    round_trip(limit, clock, latency=0.2)
    before = limit.limit
    for _ in range(3):
        round_trip(limit, clock, latency=1.0)
    assert limit.limit < before
    assert limit.cuts >= 1


def test_an_idle_limit_does_not_grow() -> None:
    clock = Clock()
    limit = HostLimit(128, 8, clock=clock)
    for _ in range(50):  # one request at a time: says nothing about 100 at a time
        ticket = limit.acquire(0)
        clock.now += 0.5
        limit.answered(ticket, 0.5)
        limit.release(ticket)
    assert limit.limit == 8


def test_a_limit_above_the_demand_does_not_grow() -> None:
    clock = Clock()
    limit = HostLimit(128, 16, clock=clock)
    for _ in range(20):  # 12 at a time under a limit of 16: the limit holds nothing back
        tickets = [limit.acquire(0) for _ in range(12)]
        clock.now += 0.5
        for ticket in tickets:
            limit.answered(ticket, 0.5)
            limit.release(ticket)
    assert limit.limit == 16
    round_trip(limit, clock)  # the demand reaches it: growth resumes
    assert limit.limit == 32


def test_a_request_held_back_by_a_pause_does_not_make_the_limit_grow() -> None:
    clock = Clock()
    limit = HostLimit(128, 16, clock=clock)
    first = limit.acquire(0)
    limit.overloaded(first, retry_after_s=0.2)  # halved to 8, and nothing new for 0.2 s
    limit.release(first)
    assert limit.acquire(0) is None  # it waits for the pause with 8 slots free
    clock.now += 0.2
    tickets = [limit.acquire(0) for _ in range(4)]  # then 4 at a time under a limit of 8
    clock.now += 0.3
    for ticket in tickets:
        limit.answered(ticket, 0.3)
        limit.release(ticket)
    assert limit.limit == 8


def test_a_fixed_limit_ignores_signals() -> None:
    clock = Clock()
    limit = HostLimit(16, 4, adaptive=False, clock=clock)
    tickets = [limit.acquire(0) for _ in range(16)]
    assert None not in tickets
    assert limit.acquire(0) is None
    limit.overloaded(tickets[0], retry_after_s=5)
    limit.release(tickets[0])
    assert limit.acquire(0) is not None
    assert limit.limit == 16


def test_acquire_waits_for_a_release_from_another_thread() -> None:
    limit = HostLimit(1)
    held = limit.acquire(0)
    threading.Timer(0.05, limit.release, [held]).start()
    assert limit.acquire(5.0) is not None
    assert limit.acquire(0.01) is None


def queue_up(limit: HostLimit, priorities: list[int], timeout: float = 10.0) -> tuple[list, list]:
    """A thread per priority waiting for a slot, started one at a time (each queued
    before the next starts); returns the threads and the order slots were given in."""
    order: list[int] = []
    threads = []

    def wait(priority: int) -> None:
        ticket = limit.acquire(timeout, (priority,))
        if ticket is not None:
            order.append(priority)
            limit.release(ticket)

    for n, priority in enumerate(priorities, start=1):
        threads.append(threading.Thread(target=wait, args=(priority,)))
        threads[-1].start()
        while limit.snapshot().waiting < n:
            threading.Event().wait(0.001)
    return threads, order


def test_a_burst_mostly_refused_cuts_to_what_the_host_took() -> None:
    clock = Clock()
    limit = HostLimit(256, 16, clock=clock)
    tickets = [limit.acquire(0) for _ in range(16)]
    clock.now += 0.2
    for ticket in tickets[4:]:  # a host that copes with 4 refuses the other 12
        limit.overloaded(ticket)
    assert limit.limit == 4
    assert limit.cuts == 1
    for ticket in tickets:
        limit.release(ticket)
    later = [limit.acquire(0) for _ in range(4)]
    clock.now += 0.2
    limit.overloaded(later[0])  # a new burst: halved again
    limit.overloaded(tickets[0])  # an answer from before the last two cuts changes nothing
    assert limit.limit == 2


def test_waiting_requests_get_slots_lowest_priority_first() -> None:
    limit = HostLimit(1)
    held = limit.acquire(0)
    threads, order = queue_up(limit, [5, 1, 3, 2, 4])  # arrival order is not slot order
    limit.release(held)
    for thread in threads:
        thread.join(10)
    assert order == [1, 2, 3, 4, 5]
    assert limit.snapshot().waiting == 0


def test_a_request_that_gives_up_waiting_leaves_the_line() -> None:
    limit = HostLimit(1)
    held = limit.acquire(0)
    threads, order = queue_up(limit, [2, 3])
    assert limit.acquire(0.05, (1,)) is None  # first in line, but no slot came in time
    assert limit.snapshot().waiting == 2
    limit.release(held)
    for thread in threads:
        thread.join(10)
    assert order == [2, 3]


def test_limits_per_host_are_separate_and_bounded() -> None:
    limits = HostLimits(8, 2, size=3)
    a = limits.get("a")
    assert limits.get("a") is a
    assert limits.get("b") is not a
    busy = limits.get("c").acquire(0)
    assert busy is not None
    limits.get("d")  # over size: idle hosts forgotten, busy ones kept
    assert set(limits.snapshot()) == {"c", "d"}
