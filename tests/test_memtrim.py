"""memtrim gives the heap's free memory back to the system (Linux/glibc)."""

from __future__ import annotations

import os
import subprocess
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


def run_fresh(code: str, *args: str, env: dict[str, str]) -> str:
    """What a fresh interpreter running ``code`` printed."""
    run = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    return run.stdout.strip()


def environ_without(name: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != name}


# A fresh process starts 8 threads that each malloc, then counts its arenas with glibc's
# malloc_info (one <heap> element per arena).
ARENAS_AFTER_THREADS = """
import ctypes, re, sys, tempfile, threading
from imgtasks import memtrim
if sys.argv[1] == "one":
    assert memtrim.one_arena() is True
start = threading.Barrier(8)
def allocate():
    start.wait()  # all alive at once: a thread that ended frees its arena for the next
    blocks = [bytearray(4096) for _ in range(100)]  # > 512 bytes: malloc, not pymalloc
    start.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile("r") as out:
    f = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(f))
    libc.fclose(ctypes.c_void_p(f))
    print(len(re.findall(r'<heap nr="', out.read())))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("mode, expect_one", [("one", True), ("default", False)])
def test_one_arena_keeps_new_threads_on_the_main_arena(mode: str, expect_one: bool) -> None:
    arenas = int(run_fresh(ARENAS_AFTER_THREADS, mode, env=environ_without("MALLOC_ARENA_MAX")))
    assert (arenas == 1) is expect_one, (mode, arenas)


POOL_AFTER_COMMAND_LINE_SETUP = """
from imgtasks import memtrim
memtrim.for_command_line()
import pyarrow as pa
print(pa.default_memory_pool().backend_name)
"""


@pytest.mark.parametrize(("users_pool", "expected"), [(None, "system"), ("mimalloc", "mimalloc")])
def test_the_command_line_gives_pyarrow_the_system_allocator_unless_the_user_chose(
    users_pool: str | None, expected: str
) -> None:
    env = environ_without("ARROW_DEFAULT_MEMORY_POOL")
    if users_pool:
        env["ARROW_DEFAULT_MEMORY_POOL"] = users_pool
    assert run_fresh(POOL_AFTER_COMMAND_LINE_SETUP, env=env) == expected
