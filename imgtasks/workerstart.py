"""How our local workers start: forked from multiprocessing's fork server, not spawned.

A spawned worker is a fresh interpreter that imports distributed and our stages (~0.55 s
of CPU each, measured on 2 cores). The fork server imports them once, in the background,
and forks each worker from there in milliseconds. Not pandas: no stage imports it (the
manifest builds its Arrow arrays without ``pa.array``, which would), and preloading it
kept the server from forking the first worker for 0.5 s more.

Standard library only, no dask: ``flows/run.py`` starts the server before it imports
anything else, so that the server's imports overlap the command line's own (~0.9 s)
instead of following them. ``imgtasks.cluster.warm_worker_start`` starts it otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
from collections.abc import Iterator, Mapping, Sequence

# Where there is no fork server (Windows), workers are spawned as Dask does by default.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
# What the server imports before it forks anything: distributed and our stages, by one
# module of ours that also keeps the garbage collector out of it (and out of the workers).
PRELOAD = ("imgtasks.forkserverpreload",)
# What a worker needs in its environment from the moment its interpreter starts, for a
# server started before Dask's config can be read (importing distributed takes 0.4 s):
# Dask's ``distributed.nanny.pre-spawn-environ`` defaults, ours over them
# (cluster.WORKER_PRE_SPAWN_ENVIRON; None: unset) and the hash seed every Nanny sets.
# A test checks it against what ``cluster.pre_spawn_environ`` reads from Dask's config.
DEFAULT_ENVIRON: Mapping[str, str | None] = {
    "MALLOC_TRIM_THRESHOLD_": None,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    "MALLOC_ARENA_MAX": "1",
    "PYTHONHASHSEED": "6640",
}


_started_with: dict[str, str | None] | None = None  # the running server's environment

# The server is `python -c ...`, so Python puts the current directory first on its path,
# and CPython's fork server does not apply the sys.path it is handed (3.10-3.13): an
# `imgtasks/` (or a `dask.py`...) where the command was started from would be what every
# worker imports, not what this process imported. Python 3.11+ leaves it out with this.
SERVER_ENVIRON: Mapping[str, str | None] = {"PYTHONSAFEPATH": "1"}


def start_fork_server(environ: Mapping[str, str | None]) -> None:
    """Make sure a fork server started with ``environ`` (None: unset) runs, and return at
    once: a new one imports PRELOAD meanwhile. One started with another environment is
    stopped first (a cluster with other ``worker_environ``: its workers must start with
    theirs). Workers it forked for a cluster still running would then look dead to their
    nannies: close a cluster before starting one with another environment."""
    global _started_with
    if START_METHOD != "forkserver":
        return
    wanted = dict(environ)
    if _started_with is not None and _started_with != wanted:
        stop_fork_server()
    context = multiprocessing.get_context(START_METHOD)
    context.set_forkserver_preload(list(PRELOAD))
    with _environ(wanted | SERVER_ENVIRON):
        multiprocessing.forkserver.ensure_running()
    _started_with = wanted


def start_for_command_line(argv: Sequence[str]) -> None:
    """``flows/run.py``'s first step: start the fork server unless the run will use a
    running cluster or no workers (``--scheduler ADDRESS``/``sync``, ``--scheduler-file``)
    or only asks for help. A user's own value of a variable still wins, as in Dask."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--scheduler", default="hybrid")
    parser.add_argument("--scheduler-file")
    parser.add_argument("-h", "--help", action="store_true")
    known, _ = parser.parse_known_args(argv)
    local = known.scheduler in ("hybrid", "processes", "threads") and not known.scheduler_file
    if local and not known.help:
        start_fork_server(default_environ())


def default_environ() -> dict[str, str | None]:
    """DEFAULT_ENVIRON, with the user's own values first (as Nanny reads Dask's
    pre-spawn environment); the hash seed is always Nanny's."""
    seed = {"PYTHONHASHSEED": DEFAULT_ENVIRON["PYTHONHASHSEED"]}
    return {k: os.environ.get(k, v) for k, v in DEFAULT_ENVIRON.items()} | seed


def stop_fork_server() -> None:
    """Stop the fork server, if running, and wait for it (the command line does, as it
    exits). Its CPU time, and through it its workers', then counts in this process's
    children, as a spawned worker's did: without the wait the server outlives this
    process, and whoever measures it (``benchmarks/``) sees none of the workers' CPU."""
    global _started_with
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    stop = getattr(server, "_stop", None)  # CPython's own, used by its tests; 3.9-3.13
    if stop is not None:
        stop()
        _started_with = None


@contextlib.contextmanager
def _environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (None: unset) these variables inside, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    try:
        _apply(values)
        yield
    finally:
        _apply(old)


def _apply(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
