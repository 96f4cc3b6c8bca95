from __future__ import annotations

import os

import psutil
import pytest
from distributed import Nanny, Scheduler

from imgtasks.cluster import (
    ClusterSettings,
    connect,
    has_routing,
    scheduler_spec,
    worker_resources,
    worker_specs,
)


def test_hybrid_spec_has_an_io_pool_and_cpu_pool() -> None:
    specs = worker_specs(ClusterSettings(kind="hybrid", io_threads=24, cpu_workers=3))
    assert sorted(specs) == ["cpu-0", "cpu-1", "cpu-2", "io"]
    io = specs["io"]["options"]
    assert specs["io"]["cls"] is Nanny
    # resource amount = thread count, or the I/O worker runs one download at a time
    assert io["nthreads"] == 24 and io["resources"] == {"io": 24}
    for name in ("cpu-0", "cpu-1", "cpu-2"):
        assert specs[name]["options"]["nthreads"] == 1
        assert specs[name]["options"]["resources"] == {"cpu": 1}


@pytest.mark.parametrize("kind", ["hybrid", "processes", "threads"])
def test_memory_limits_add_up_to_less_than_the_machine(kind: str) -> None:
    specs = worker_specs(ClusterSettings(kind=kind, cpu_workers=4))
    total = sum(s["options"]["memory_limit"] for s in specs.values())
    assert 0 < total <= psutil.virtual_memory().total


def test_everything_binds_loopback_by_default() -> None:
    settings = ClusterSettings()
    assert scheduler_spec(settings) == {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:8787"},
    }
    for spec in worker_specs(settings).values():
        assert spec["options"]["host"] == "127.0.0.1"
        assert spec["options"]["dashboard_address"].startswith("127.0.0.1:")


def test_processes_and_threads_shapes() -> None:
    procs = worker_specs(ClusterSettings(kind="processes", cpu_workers=2))
    assert [s["options"]["nthreads"] for s in procs.values()] == [1, 1]
    assert all(s["options"]["resources"] == {} for s in procs.values())
    threads = worker_specs(ClusterSettings(kind="threads", cpu_workers=2))
    assert len(threads) == 1 and next(iter(threads.values()))["options"]["nthreads"] >= 2


@pytest.mark.parametrize(
    "kwargs",
    [{"kind": "bogus"}, {"io_threads": 0}, {"cpu_workers": 0}, {"memory_fraction": 1.5}],
)
def test_bad_settings_raise_early(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ClusterSettings(**kwargs)


def test_addresses_are_remote() -> None:
    assert ClusterSettings(kind="tcp://10.0.0.1:8786").is_remote
    assert ClusterSettings(scheduler_file="/tmp/s.json").is_remote
    assert not ClusterSettings(kind="hybrid").is_remote


@pytest.mark.timeout(120)
def test_hybrid_cluster_starts_with_routing_and_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    # A nanny started earlier in this process leaves Dask's value in os.environ.
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    settings = ClusterSettings(
        kind="hybrid", io_threads=4, cpu_workers=2, dashboard_address="127.0.0.1:0"
    )
    client, cluster = connect(settings)
    try:
        client.wait_for_workers(3, timeout=60)
        assert sorted(map(sorted, (r.items() for r in worker_resources(client)))) == sorted(
            [[("io", 4.0)], [("cpu", 1.0)], [("cpu", 1.0)]]
        )
        assert has_routing(client)
        import dask

        with dask.annotate(resources={"io": 1}):
            where_io = dask.delayed(_worker_name, pure=False)()
        with dask.annotate(resources={"cpu": 1}):
            where_cpu = [dask.delayed(_worker_name, pure=False)() for _ in range(4)]
        got_io, got_cpu = client.compute([where_io, where_cpu], sync=True)
        assert got_io == "io"
        assert set(got_cpu) <= {"cpu-0", "cpu-1"}
        # Dask's MALLOC_TRIM_THRESHOLD_ makes every image buffer an mmap: not on our workers
        trim = client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_")
        assert trim and set(trim.values()) == {None}
    finally:
        client.close()
        assert cluster is not None
        cluster.close()


def _worker_name() -> str:
    from distributed import get_worker

    return str(get_worker().name)
