"""Dask task threads that run download nodes are renewed every RENEW_AFTER nodes."""

from __future__ import annotations

import threading

from distributed import Client, LocalCluster

from imgtasks import taskthreads
from imgtasks.taskthreads import RENEW_AFTER, renewing


def thread_name(i: int) -> str:
    return threading.current_thread().name


def test_a_task_thread_runs_at_most_renew_after_nodes_and_the_pool_keeps_its_size() -> None:
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        futures = [
            client.submit(renewing, thread_name, i, pure=False) for i in range(6 * RENEW_AFTER)
        ]
        names = client.gather(futures)
        (worker,) = cluster.workers.values()
        pool = worker.executors["default"]
        alive = [t for t in pool._threads if t.is_alive()]
    assert max(names.count(n) for n in names) <= RENEW_AFTER, names
    assert len(set(names)) >= 6, names
    assert len(alive) <= 2, alive  # replacements, not extra threads


def test_outside_a_dask_task_thread_nothing_is_renewed() -> None:
    """The sync scheduler runs nodes on the caller's thread: it must not leave anything."""
    for i in range(3 * RENEW_AFTER):
        assert renewing(thread_name, i) == threading.current_thread().name
    assert taskthreads._runs.count >= 3 * RENEW_AFTER
