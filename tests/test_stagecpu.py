"""imgtasks.stagecpu: the stages' CPU counters the CPU breakdown benchmark reads."""

from __future__ import annotations

import threading

from imgtasks import stagecpu


def _spin(n: int) -> int:
    return sum(i * i for i in range(n))


def test_counted_adds_the_threads_cpu_and_calls() -> None:
    stagecpu.reset()
    for _ in range(3):
        with stagecpu.counted("work"):
            _spin(200_000)
    with stagecpu.counted("idle"):
        threading.Event().wait(0.05)  # off-CPU: a wait is not counted
    cpu, calls = stagecpu.snapshot()["work"]
    assert calls == 3 and cpu > 0.005
    idle, _ = stagecpu.snapshot()["idle"]
    assert idle < cpu / 3
    stagecpu.reset()
    assert stagecpu.snapshot() == {}


def test_counted_counts_from_many_threads_and_through_exceptions() -> None:
    stagecpu.reset()

    def count() -> None:
        for _ in range(500):
            with stagecpu.counted("fetch"):
                pass

    threads = [threading.Thread(target=count) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        with stagecpu.counted("fetch"):
            raise ValueError("a failing stage still counts")
    except ValueError:
        pass
    assert stagecpu.snapshot()["fetch"][1] == 8 * 500 + 1
    stagecpu.reset()
