"""Dask task threads that download are renewed every few batches.

A thread of a Dask worker lives as long as the worker, and glibc gives back the freed
chunks it caches per thread (tcache: up to 7 of every size up to 1 KiB) only when the
thread exits. In the I/O worker, the 32 task threads free what the download threads
allocated, so their caches fill with sizes they never ask for again: glibc's bytes in
use crept ~0.5 MiB per 30,000 URLs, ~20 MiB over a million (benchmarks/README,
``io_memory.py``; a per-thread probe found most of it in the task threads). Renewing the
task threads every RENEW_AFTER download nodes, with the download threads every 500
fetches (``keyedpool.RenewedThreads``), kept it flat.

The thread leaves Dask's executor (its ``secede``, not ``distributed.secede``: the task
stays a normal task to the scheduler, its resources held until it ends), the executor
starts a replacement at once, and the old thread exits when the task returns. Orchestration,
not a stage: it knows Dask's executor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from distributed.threadpoolexecutor import ThreadPoolExecutor, secede, thread_state

RENEW_AFTER = 4  # download nodes per task thread (batches of 128: ~57 renewals per 30k URLs)

T = TypeVar("T")
_runs = threading.local()


def renewing(node: Callable[..., T], *args: Any) -> T:
    """``node(*args)``, on a Dask task thread that is renewed every RENEW_AFTER calls."""
    try:
        return node(*args)
    finally:
        _count_and_renew()


def _count_and_renew() -> None:
    runs = getattr(_runs, "count", 0) + 1
    _runs.count = runs
    if runs >= RENEW_AFTER and isinstance(
        getattr(thread_state, "executor", None), ThreadPoolExecutor
    ):
        secede(adjust=True)  # this thread ends with its task; a fresh one replaces it
