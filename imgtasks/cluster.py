"""Clusters as data: worker specs built by functions, started by distributed's SpecCluster.

The one module of ``imgtasks`` that imports dask. Kinds:

- ``hybrid`` (default): one I/O worker process with ``io_threads`` threads and the resource
  ``io=io_threads``, plus ``cpu_workers`` single-threaded processes with ``cpu=1``. Download
  nodes ask for ``io=1`` and thumbnail nodes for ``cpu=1``, so each lands on its own pool.
  Resource amounts equal thread counts: a 32-thread worker declared with ``io=1`` would run
  one download at a time.
- ``processes``: ``cpu_workers`` single-threaded processes, both stages on all of them (a
  download node overlaps its downloads with its own thread pool).
- ``threads``: one worker process with several threads.
- ``sync``: no cluster, Dask's synchronous scheduler (debugging; no dashboard).
- an address (``tcp://host:8786``) or a scheduler file: a running cluster.

Every local server binds 127.0.0.1; memory limits are set so they add up to at most
``memory_fraction`` of the machine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dask
import psutil
from distributed import Client, Nanny, Scheduler, SpecCluster

log = logging.getLogger(__name__)

LOCAL_KINDS = ("hybrid", "processes", "threads")
KINDS = (*LOCAL_KINDS, "sync")
IO_RESOURCE = "io"
CPU_RESOURCE = "cpu"
DEFAULT_DASHBOARD = "127.0.0.1:8787"
DEFAULT_IO_THREADS = 32
LOOPBACK = "127.0.0.1"
# Environment our local workers are spawned with, over Dask's ``pre-spawn-environ``.
# Dask sets MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap threshold at
# 128 KiB: every downloaded image and every decode buffer then becomes a fresh mmap, and
# each page of it a page fault. Measured on 1000 demo images through a hybrid cluster:
# 480-510k page faults per CPU worker with it, 95-210k without, and ~5-10 % less CPU
# per thumbnail. Memory stays bounded by the flow's window either way. None = unset;
# a value in the user's own environment still wins (Dask reads os.environ first).
WORKER_PRE_SPAWN_ENVIRON: Mapping[str, Any] = {"MALLOC_TRIM_THRESHOLD_": None}


@dataclass(frozen=True)
class ClusterSettings:
    """Which cluster to run on, and its shape when it is local."""

    kind: str = "hybrid"  # one of KINDS, or an address like tcp://host:8786
    scheduler_file: str | None = None
    io_threads: int = DEFAULT_IO_THREADS
    cpu_workers: int = os.cpu_count() or 1
    dashboard_address: str = DEFAULT_DASHBOARD
    host: str = LOOPBACK
    memory_fraction: float = 0.8
    # variables set (None: unset) before spawning local workers; see WORKER_PRE_SPAWN_ENVIRON
    worker_environ: Mapping[str, Any] = field(
        default_factory=lambda: dict(WORKER_PRE_SPAWN_ENVIRON), hash=False
    )

    def __post_init__(self) -> None:
        if self.scheduler_file is None and not (self.kind in KINDS or "://" in self.kind):
            raise ValueError(
                f"scheduler must be one of {', '.join(KINDS)} or an address like "
                f"tcp://host:8786, got {self.kind!r}"
            )
        if self.io_threads < 1:
            raise ValueError(f"--io-threads must be >= 1, got {self.io_threads}")
        if self.cpu_workers < 1:
            raise ValueError(f"--cpu-workers must be >= 1, got {self.cpu_workers}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory fraction must be in (0, 1], got {self.memory_fraction}")

    @property
    def is_local(self) -> bool:
        return self.scheduler_file is None and self.kind in LOCAL_KINDS

    @property
    def is_remote(self) -> bool:
        return self.scheduler_file is not None or "://" in self.kind


def threads_mode_threads(settings: ClusterSettings) -> int:
    # Pillow releases the GIL while decoding and resizing, so a few threads per core keep
    # the cores busy while other threads wait on the network inside their download nodes.
    return max(4, 2 * settings.cpu_workers)


def worker_specs(settings: ClusterSettings) -> dict[str, dict[str, Any]]:
    """The workers of a local cluster, as ``{name: {"cls": ..., "options": ...}}``."""
    if settings.kind == "hybrid":
        shapes = {"io": (settings.io_threads, {IO_RESOURCE: settings.io_threads})}
        shapes |= {f"cpu-{i}": (1, {CPU_RESOURCE: 1}) for i in range(settings.cpu_workers)}
    elif settings.kind == "processes":
        shapes = {f"proc-{i}": (1, {}) for i in range(settings.cpu_workers)}
    elif settings.kind == "threads":
        shapes = {"threads": (threads_mode_threads(settings), {})}
    else:
        raise ValueError(f"{settings.kind!r} is not a local cluster kind")
    memory = memory_per_worker(settings, len(shapes))
    return {
        name: {"cls": Nanny, "options": worker_options(settings, nthreads, resources, memory)}
        for name, (nthreads, resources) in shapes.items()
    }


def worker_options(
    settings: ClusterSettings, nthreads: int, resources: dict[str, int], memory: int
) -> dict[str, Any]:
    return {
        "nthreads": nthreads,
        "resources": resources,
        "memory_limit": memory,
        "host": settings.host,
        "dashboard_address": f"{settings.host}:0",
        "silence_logs": logging.WARNING,
    }


def memory_per_worker(settings: ClusterSettings, workers: int) -> int:
    """Split the machine's memory so the limits add up to no more than it."""
    return int(psutil.virtual_memory().total * settings.memory_fraction / workers)


def scheduler_spec(settings: ClusterSettings) -> dict[str, Any]:
    return {
        "cls": Scheduler,
        "options": {"host": settings.host, "dashboard_address": settings.dashboard_address},
    }


def start_local_cluster(settings: ClusterSettings) -> SpecCluster:
    log.info("starting a %s cluster", settings.kind)
    # Nannies read this config when SpecCluster() creates them; restarted workers keep it.
    environ = {
        f"distributed.nanny.pre-spawn-environ.{name}": value
        for name, value in settings.worker_environ.items()
    }
    with dask.config.set(environ):
        return SpecCluster(
            workers=worker_specs(settings),
            scheduler=scheduler_spec(settings),
            silence_logs=logging.WARNING,
            name=f"imgtasks-{settings.kind}",
        )


def local_cluster(settings: ClusterSettings | None = None) -> SpecCluster:
    """The local cluster ``settings`` describe (default: the hybrid one), for a client of
    your own: ``Client(imgtasks.local_cluster())``, then ``thumbnails(..., client=...)``."""
    settings = settings or ClusterSettings()
    if not settings.is_local:
        raise ValueError(f"{settings.kind!r} is not a local cluster kind: {LOCAL_KINDS}")
    return start_local_cluster(settings)


def connect(settings: ClusterSettings) -> tuple[Client, SpecCluster | None]:
    """A client on the cluster the settings name (and the cluster when we started it)."""
    if settings.scheduler_file is not None:
        return Client(scheduler_file=settings.scheduler_file, timeout="30s"), None
    if settings.is_remote:
        return Client(settings.kind, timeout="30s"), None
    cluster = start_local_cluster(settings)
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise


def worker_resources(client: Client) -> list[dict[str, float]]:
    """The resources of every worker of the cluster."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return [dict(w.get("resources") or {}) for w in workers]


def has_routing(client: Client) -> bool:
    """True when the cluster has both an I/O and a CPU pool to route stages to."""
    resources = worker_resources(client)
    has_io = any(r.get(IO_RESOURCE, 0) >= 1 for r in resources)
    has_cpu = any(r.get(CPU_RESOURCE, 0) >= 1 for r in resources)
    return has_io and has_cpu
