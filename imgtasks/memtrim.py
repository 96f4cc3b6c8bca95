"""Give the heap's free memory back to the operating system (glibc's ``malloc_trim``).

Why: the I/O worker compacts manifest parts (pyarrow reads ~600 small parts and writes
one). glibc keeps what that freed in the arenas of whichever of the I/O pool's threads
ran it: 30k tiny images, the I/O worker's RSS jumped ~20 MiB at the first compaction and
crept after each; with a trim after each compaction, no jump, and 10k -> 100k URLs went
from x1.33 to x1.12 (``benchmarks/scale_bench.py --counts 10000,100000``).
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
import time
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim from the symbols already loaded (no library search: this runs
    in every worker, and ``ctypes.util.find_library`` took 3 ms), on first use."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


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
