"""Give the heap's free memory back to the operating system (glibc's ``malloc_trim``),
and keep it from spreading over one malloc arena per thread (``mallopt``).

Why: the I/O worker compacts manifest parts (pyarrow reads ~600 small parts and writes
one). glibc keeps what that freed in the arenas of whichever of the I/O pool's threads
ran it: 30k tiny images, the I/O worker's RSS jumped ~20 MiB at the first compaction and
crept after each; with a trim after each compaction, no jump, and 10k -> 100k URLs went
from x1.33 to x1.12 (``benchmarks/scale_bench.py --counts 10000,100000``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
import time
from collections.abc import Callable

M_ARENA_MAX = -8  # glibc's malloc.h


def _glibc(name: str) -> Callable[..., int] | None:
    """A glibc malloc function from the symbols already loaded (no library search: this
    runs in every worker, and ``ctypes.util.find_library`` took 3 ms); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # musl and others have no malloc_trim nor mallopt
        return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    return _glibc("malloc_trim")


@functools.cache
def one_arena() -> bool:
    """From now on, threads that have no malloc arena yet share those there are (the main
    one, in a process that calls this before starting its threads). False where there is
    no ``mallopt`` (not glibc); once per process.

    Why: glibc gives new threads arenas of their own, up to 8 per core, and the I/O
    worker's ~100 download threads left memory pinned in them. 100k tiny images at
    0 ms (RSS of the I/O worker 30 s in -> at the end, and its peak): 134 -> 142 MiB, peak
    150, the thread arenas growing 5 -> 15 MiB; with one arena from the start
    (``MALLOC_ARENA_MAX=1``) 122 -> 125, peak 133 in one run, 122 -> 135, peak 143 in
    another: a lower level, not the end of the creep. The threads allocate holding the
    GIL, so one arena's lock costs them little (10k URLs, 2 interleaved pairs: no change).
    """
    mallopt = _glibc("mallopt")
    return mallopt is not None and mallopt(M_ARENA_MAX, 1) == 1


def trim() -> bool:
    """Return the free memory of every malloc arena to the system; False where there is
    no ``malloc_trim`` (not glibc)."""
    malloc_trim = _malloc_trim()
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


_last_trim = float("-inf")
_trim_lock = threading.Lock()


def trim_every(seconds: float, clock: Callable[[], float] = time.monotonic) -> bool:
    """:func:`trim`, at most once per ``seconds`` in this process (any thread may call it
    as often as it likes); True if this call trimmed."""
    global _last_trim
    now = clock()
    with _trim_lock:
        if now - _last_trim < seconds:
            return False
        _last_trim = now
    return trim()


# What the command line's own process (client, and scheduler with a local cluster) sets
# for itself before it imports pyarrow. Measured on 10k tiny images: its peak RSS came at
# the very end, the contact sheet reading a 10k-row manifest part, +12 MiB with pyarrow's
# default allocator (mimalloc), +3 with the system's (the workers' already, through
# cluster.WORKER_PRE_SPAWN_ENVIRON).
COMMAND_LINE_ENVIRON: dict[str, str] = {"ARROW_DEFAULT_MEMORY_POOL": "system"}


def for_command_line() -> None:
    """Set up the command line's process as our workers are: the system allocator for
    pyarrow and one malloc arena, unless the user's environment says otherwise. Only
    ``flows/``: the library leaves an API user's process as it is."""
    for name, value in COMMAND_LINE_ENVIRON.items():
        os.environ.setdefault(name, value)
    if "MALLOC_ARENA_MAX" not in os.environ:
        one_arena()
