"""memtrim gives the heap's free memory back to the system (Linux/glibc)."""

from __future__ import annotations

import sys

import psutil
import pytest

from imgtasks import memtrim


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trim_returns_freed_heap_memory() -> None:
    process = psutil.Process()
    blocks = [bytes(1000 + i % 7) for i in range(100_000)]  # ~100 MB of malloc'd blocks
    kept = blocks[::1000]  # a few survivors pin the heap's top: only a trim frees the rest
    del blocks
    before = process.memory_info().rss
    assert memtrim.trim() is True
    after = process.memory_info().rss
    assert before - after > 50 * 2**20, (before >> 20, after >> 20)
    assert len(kept) == 100


def test_trim_every_trims_at_most_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memtrim, "_last_trim", float("-inf"))
    calls: list[int] = []
    monkeypatch.setattr(memtrim, "trim", lambda: calls.append(1) or True)
    now = [100.0]
    clock = lambda: now[0]  # noqa: E731
    assert memtrim.trim_every(2.0, clock) is True
    now[0] = 101.9
    assert memtrim.trim_every(2.0, clock) is False
    now[0] = 102.1
    assert memtrim.trim_every(2.0, clock) is True
    assert len(calls) == 2
