"""Dask's ``key_split`` cache, cleared every CLEAR_EVERY batches in every process of a run.

``dask.utils.key_split`` is an ``lru_cache(100000)``. The scheduler calls it on every task
key it is sent (its ``_new_task``), a worker on every task it holds (``TaskState``), and
each keeps the key until 100,000 are cached: the key string (~70 bytes) and its cache
entry (94 bytes). Our keys are unique per batch, so the cache grew with the URL list:
~5 MB per million URLs in the client (a local scheduler runs in it) and in each worker,
up to ~16 MB at ~3.5M URLs (``tracemalloc`` found it growing at ``scheduler.py``'s
``key_split`` call). Cleared every CLEAR_EVERY batches, a process holds only the keys
since the last clear. Dask computes a key's prefix again on its next call: a string
split, microseconds. (It was taken for the client's creep in the traced 1M-URL run;
clearing it did not change that RSS slope: benchmarks/README, session 18.)

Orchestration, not a stage: it knows Dask.
"""

from __future__ import annotations

import logging

from dask.utils import key_split
from distributed import Client

log = logging.getLogger(__name__)

CLEAR_EVERY = 1000  # batches: ~2-3 task keys each, so ~3,000 keys (~0.5 MB) at most


class KeyCacheClearing:
    """Counts finished batches; every CLEAR_EVERY, clears the cache everywhere."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.batches = 0

    def batch_done(self) -> None:
        self.batches += 1
        if self.batches % CLEAR_EVERY == 0:
            clear_everywhere(self.client)


def clear_everywhere(client: Client) -> None:
    """In this process (the client, and a local scheduler started in it), the scheduler's
    and every worker's. ``key_split.cache_clear`` is sent as a reference to dask's own
    function, so a scheduler without our package clears it too. A run never stops for
    this: a worker that is gone or a scheduler that refuses pickled calls keeps its cache."""
    key_split.cache_clear()
    try:
        client.run_on_scheduler(key_split.cache_clear)
        client.run(key_split.cache_clear, on_error="ignore")
    except Exception as exc:
        log.debug("Dask's key_split cache not cleared everywhere: %s", exc)
