"""Give the heap's free memory back to the operating system (glibc's ``malloc_trim``).

Why: the I/O worker compacts manifest parts (pyarrow reads ~600 small parts and writes
one). glibc keeps what that freed in the arenas of whichever of the I/O pool's threads
ran it: 30k tiny images, the I/O worker's RSS jumped ~20 MiB at the first compaction and
crept after each; with a trim after each compaction, no jump, and 10k -> 100k URLs went
from x1.33 to x1.12 (``benchmarks/scale_bench.py --counts 10000,100000``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _malloc_trim() -> object:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


_trim = _malloc_trim()


def trim() -> bool:
    """Return the free memory of every malloc arena to the system; False where there is
    no ``malloc_trim`` (not glibc)."""
    if _trim is None:
        return False
    _trim(0)
    return True
