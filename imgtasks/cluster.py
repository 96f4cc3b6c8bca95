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
- an address (``tls://host:8786``, ``tcp://host:8786``) or a scheduler file: a running
  cluster; a ``tls://`` one with the client's certificates (settings or Dask's config).

Every local server binds 127.0.0.1; memory limits are set so they add up to at most
``memory_fraction`` of the machine. A scheduler runs whatever code a client sends it, so
local clusters speak TLS with a certificate authority made for the run: other users of the
machine can reach 127.0.0.1, but only this run's client and workers hold the certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import gc
import ipaddress
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import dask
import distributed.utils
import psutil
import tornado.escape
import tornado.web
from distributed import Client, Nanny, Scheduler, SpecCluster, WorkerPlugin
from distributed.comm.core import CommClosedError
from distributed.core import Status
from distributed.nanny import WorkerProcess
from distributed.security import Security
from distributed.utils import clean_dashboard_address

from imgtasks import preflight, workerstart
from imgtasks.sinks import OutputSettings, file_exists

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
# per thumbnail. Memory stays bounded by the flow's window either way.
# pyarrow's default allocator (mimalloc) keeps a heap per thread that touches it, and the
# I/O worker's many threads write and compact manifest parts: its peak RSS grew x1.93
# from 10k to 200k URLs (scale_bench). With the system allocator, three rounds of 20k
# URLs on one cluster: 150 -> 153 -> 161 MiB, against 171 -> 193 -> 208 with mimalloc.
# One malloc arena (memtrim.one_arena says why): set from the start here, so that none of
# the threads Dask starts before the first download gets an arena of its own either.
# None = unset; a value in the user's own environment still wins (Dask reads os.environ
# first).
WORKER_PRE_SPAWN_ENVIRON: Mapping[str, Any] = {
    "MALLOC_TRIM_THRESHOLD_": None,
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    "MALLOC_ARENA_MAX": "1",
}
# Dask's statistical profiler calls sys._current_frames() every 10 ms in every worker; on
# CPython 3.11 that can deadlock (gh-106883: the thread-list lock and the GIL taken in
# opposite orders when a garbage collection starts inside it; gone in 3.12). Seen on a
# 16-host, 1 s run: the I/O worker froze for good 15 s in, its main thread inside the
# profiler's gc callback, 93 download threads never reading the answers that had come
# (the demo server closed those idle connections about a minute later). Our workers,
# with hundreds of threads started and ended per batch, do not profile there (the
# dashboard's profile page stays empty).
WORKER_CONFIG: Mapping[str, Any] = (
    {"distributed.worker.profile.enabled": False} if sys.version_info < (3, 12) else {}
)
# Config for the whole of a run on a client we make (and a local cluster's scheduler and
# workers: nannies hand workers the config they were made with). Dask keeps the last
# ``low-level-log-length`` (1000) messages of every connection for debugging, and each
# task message holds its batch's URLs: measured, a scheduler grew from 125 to 317 MiB
# between 10k and 1M URLs (batch 1024, one I/O worker), and would hold GBs with many
# I/O workers; with 0 it stayed at 129 MiB (benchmarks/cost_model.py --memory).
RUN_CONFIG: Mapping[str, Any] = {"distributed.admin.low-level-log-length": 0}
# Dask's system monitor keeps its last ``log-length`` samples (7,200: an hour at 500 ms) of
# a dozen figures in every process. In a local scheduler's process (the client's) that is
# ~0.5 KiB a sample: with Dask's key cache cleared, it was the largest growth there,
# +0.53 MB (monitor and psutil values) of ~1 MB between minutes 8 and 16 of a 500k-URL
# run (tracemalloc). An hour is longer than a 1M-URL run (45-65 minutes): it grew in
# every process for the whole run. Ten minutes of history (the dashboard's System page)
# are kept instead, unless the user's Dask config asks for another length.
MONITOR_KEY = "distributed.admin.system-monitor.log-length"
DASK_MONITOR_SAMPLES = 7200  # Dask's default (a test reads it from distributed.yaml)
MONITOR_SAMPLES = 1200
# Housekeeping timers of a local cluster's servers (scheduler, nannies, workers), which
# cost CPU whether or not work runs: every server checks its event loop for blocking each
# 20 ms ("tick"; it warns past 3 s, so 500 ms is fine enough), and every worker and nanny
# reads its process's memory each 100 ms (the window bounds what a worker holds; 500 ms
# still catches a runaway long before the OS does). Measured, an idle hybrid cluster (3
# workers): 0.9 CPU-s per 10 s with Dask's defaults, 0.25 with these: ~3 % of the 2
# cores of this machine back for the stages.
QUIET_TIMERS_CONFIG: Mapping[str, Any] = {
    "distributed.admin.tick.interval": "500ms",
    "distributed.worker.memory.monitor-interval": "500ms",
}
# A remote cluster's client credentials: ClusterSettings field -> (Security keyword, the
# key of Dask's config that Security() reads when the field is None).
CLIENT_TLS = {
    "tls_ca_file": ("tls_ca_file", "distributed.comm.tls.ca-file"),
    "tls_cert": ("tls_client_cert", "distributed.comm.tls.client.cert"),
    "tls_key": ("tls_client_key", "distributed.comm.tls.client.key"),
}


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
    # local clusters: plain TCP instead of TLS with a CA made for the run (debugging only:
    # then anyone who can connect to the scheduler can run code as you)
    insecure: bool = False
    # a remote tls:// cluster: the CA's certificate and this client's certificate and key
    # (PEM files; the key may be in the certificate's file). None: Dask's config
    # distributed.comm.tls.{ca-file,client.cert,client.key}.
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # a remote scheduler (or its scheduler file): how long it may take to appear, seconds
    scheduler_wait: float = preflight.SCHEDULER_WAIT_S

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
        if not self.scheduler_wait >= 0:  # NaN too
            raise ValueError(f"--scheduler-wait must be >= 0, got {self.scheduler_wait}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory fraction must be in (0, 1], got {self.memory_fraction}")
        given = [flag(name) for name in CLIENT_TLS if getattr(self, name) is not None]
        if given and not self.is_remote:
            raise ValueError(
                f"{'/'.join(given)} are for a remote tls:// scheduler; local clusters make "
                "their own certificates"
            )
        if self.insecure and self.is_remote:
            raise ValueError(
                "--insecure is for local clusters; a remote one is as secure as its address "
                "(tls:// or tcp://) and its workers"
            )

    @property
    def is_local(self) -> bool:
        return self.scheduler_file is None and self.kind in LOCAL_KINDS

    @property
    def is_remote(self) -> bool:
        return self.scheduler_file is not None or "://" in self.kind

    def tls_files(self) -> dict[str, tuple[str, str]]:
        """A remote cluster's client credentials: field name -> (where it was given, its
        path or PEM text): the setting (named by its flag), else Dask's config."""
        files = {}
        for name, (_, config_key) in CLIENT_TLS.items():
            where, value = flag(name), getattr(self, name)
            if value is None:
                where, value = config_key, dask.config.get(config_key, None)
            if value:
                files[name] = (where, str(value))
        return files


def run_config() -> contextlib.AbstractContextManager:
    """Dask's config for a run on a client (and maybe a cluster) of ours: RUN_CONFIG, and
    MONITOR_SAMPLES where the system monitor's length is Dask's default."""
    config = dict(RUN_CONFIG)
    if dask.config.get(MONITOR_KEY, None) == DASK_MONITOR_SAMPLES:
        config[MONITOR_KEY] = MONITOR_SAMPLES
    return dask.config.set(config)


def flag(field_name: str) -> str:
    """The command-line flag of a ClusterSettings field: ``tls_ca_file`` -> ``--tls-ca-file``."""
    return "--" + field_name.replace("_", "-")


def security(settings: ClusterSettings) -> Security:
    """The credentials of the client, and for a local cluster of its scheduler and workers:
    a certificate authority made for this run (:func:`temporary_security`), or for a
    remote cluster the files the settings or Dask's config name.

    TLS costs CPU on the bytes moved between workers: +5 % for the flow (~1.7 ms per 650 KB
    image, 300 demo images on 2 cores), within the noise of its wall time
    (benchmarks/README.md, "What TLS costs")."""
    if settings.is_local and not settings.insecure:
        return temporary_security()
    given = {
        keyword: getattr(settings, name)
        for name, (keyword, _) in CLIENT_TLS.items()
        if getattr(settings, name) is not None
    }
    return Security(**given)  # reads Dask's distributed.comm.* config for the rest


def temporary_security() -> Security:
    """What ``Security.temporary()`` makes (one self-signed certificate for every role,
    held in memory), with an ECDSA P-256 key instead of an RSA-2048 one.

    Why: the RSA key took 24-114 ms to make (median 56), on the start-up's critical path
    (the scheduler waits for it); the P-256 key takes 0.03 ms. And each TLS handshake
    between the run's processes signs twice (both sides show the certificate): 1.0 ms
    per signature with RSA-2048, 0.12 ms with P-256.
    """
    from cryptography import x509  # only for a local cluster's credentials
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-internal")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("dask-internal")]), False)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))  # as Dask's: crawls run long
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    pems = {"key": key_pem, "cert": cert_pem}
    roles = {
        f"tls_{r}_{part}": pem
        for r in ("client", "scheduler", "worker")
        for part, pem in pems.items()
    }
    return Security(require_encryption=True, tls_ca_file=cert_pem, **roles)


def protocol(security: Security) -> str:
    return "tls://" if security.require_encryption else "tcp://"


def threads_mode_threads(settings: ClusterSettings) -> int:
    # Pillow releases the GIL while decoding and resizing, so a few threads per core keep
    # the cores busy while other threads wait on the network inside their download nodes.
    return max(4, 2 * settings.cpu_workers)


def worker_specs(
    settings: ClusterSettings, security: Security | None = None
) -> dict[str, dict[str, Any]]:
    """The workers of a local cluster, as ``{name: {"cls": ..., "options": ...}}``;
    ``security``: the cluster's credentials (None: plain TCP)."""
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
    comm = comm_options(security)
    spawn = {"spawn_config": spawn_config(settings)}
    return {
        name: {
            "cls": LocalNanny,
            "options": worker_options(settings, nthreads, resources, memory) | comm | spawn,
        }
        for name, (nthreads, resources) in shapes.items()
    }


def spawn_config(settings: ClusterSettings) -> dict[str, Any]:
    """The Dask config our nannies read when created: the environment they spawn workers
    with, and the workers' own config (see WORKER_PRE_SPAWN_ENVIRON, WORKER_CONFIG,
    QUIET_TIMERS_CONFIG; RUN_CONFIG comes from the run's own config block)."""
    environ = {
        f"distributed.nanny.pre-spawn-environ.{name}": value
        for name, value in settings.worker_environ.items()
    }
    return environ | dict(WORKER_CONFIG) | dict(QUIET_TIMERS_CONFIG)


def warm_worker_start(settings: ClusterSettings) -> None:
    """Start the fork server our local workers are forked from (:mod:`imgtasks.workerstart`)
    if it is not running, and return at once: it imports what workers import meanwhile,
    while the scheduler starts. Its environment is the one the workers must start with
    (Dask's pre-spawn environment with ``settings.worker_environ`` over it): a forked
    worker inherits it, and variables such as MALLOC_TRIM_THRESHOLD_ only act when a
    process starts."""
    with dask.config.set(spawn_config(settings)):
        environ = pre_spawn_environ()
    workerstart.start_fork_server(environ)
    # Dask's own fork-server set-up (distributed.utils.get_mp_context) would import pandas
    # and numpy here, in the client's process, to ask for a preload the running server
    # no longer reads: ours is set.
    distributed.utils._forkserver_preload_set = True


def pre_spawn_environ() -> dict[str, str | None]:
    """What a Nanny made now sets before starting its worker (None: unset)."""
    config = dask.config.get("distributed.nanny.pre-spawn-environ")
    environ = {k: os.environ.get(k, None if v is None else str(v)) for k, v in config.items()}
    if environ.get("PYTHONHASHSEED") in (None, "0"):  # as Nanny does: one seed for all
        environ["PYTHONHASHSEED"] = "6640"
    return environ


class LocalNanny(Nanny):
    """A Nanny that reads ``spawn_config`` when it is created, wherever that happens:
    the workers of the flow's cluster are created on the cluster's event loop after
    ``start_local_cluster`` returned (``join_later``), no longer inside a config block of
    its caller. (Dask's config is global: the values are set for the time of
    ``Nanny.__init__``, on keys only nannies and workers read.)"""

    def __init__(
        self, *args: Any, spawn_config: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        with dask.config.set(dict(spawn_config or {})):
            # the workers' config is read when they spawn, later: a copy, not a view
            config = copy.deepcopy(dask.config.config)
            super().__init__(*args, config=config, **kwargs)

    async def instantiate(self) -> Status:
        # Dask reads the start method from its global config as the worker process starts
        method = {"distributed.worker.multiprocessing-method": workerstart.START_METHOD}
        with dask.config.set(method):
            return await super().instantiate()

    @property
    def process(self) -> WorkerProcess | None:
        return self._process

    @process.setter
    def process(self, value: WorkerProcess | None) -> None:
        if type(value) is WorkerProcess:
            value.__class__ = StartErrorKept  # the nanny makes it; we make it keep errors
        self._process = value


class StartErrorKept(WorkerProcess):
    """Dask's WorkerProcess, but the error of a worker that fails to start survives the
    worker's exit. Dask reads that error from a queue while the process runs, and its
    exit callback releases the queue: a forked worker exits milliseconds after failing,
    often first, and the nanny then raised a bare "Nanny failed to start worker process"
    where the cause (an import error, a bad preload) belongs."""

    start_error: BaseException | None = None

    def mark_stopped(self) -> None:
        if self.status == Status.starting and self.init_result_q is not None:
            with contextlib.suppress(Exception):  # Empty, or a queue already closed
                message = self.init_result_q.get_nowait()
                self.start_error = message.get("exception")
        super().mark_stopped()

    async def _wait_until_connected(self, uid: str) -> Any:
        message = await super()._wait_until_connected(uid)
        if message is None and self.start_error is not None:
            raise self.start_error
        return message


def comm_options(security: Security | None) -> dict[str, Any]:
    """How a local scheduler or nanny listens and connects: TLS with ``security``."""
    if security is None:
        return {}
    return {"protocol": protocol(security), "security": security}


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
        "plugins": [QuickExit(), QuietHangUps()],
    }


class QuickExit(WorkerPlugin):
    """Freezes the garbage collector as the worker closes. The worker process then exits
    without the interpreter's last full collections over every object it holds (Pillow,
    pyarrow, pandas, dask): closing a hybrid cluster after a task that imported our stages
    took 0.75-0.83 s, 0.07-0.12 s with this (3 workers, 2 cores). Objects still go by
    reference count; the nodes close their files themselves, before their task returns."""

    name = "imgtasks-quick-exit"

    def teardown(self, worker: Any) -> None:
        gc.freeze()


class QuietHangUps(WorkerPlugin):
    """A worker sending a result to a peer that hangs up (it closed, or was cancelled by a
    Ctrl-C) logs an ERROR with a traceback, "failed during get data", on the terminal of
    the run that was stopped (seen in CI: the Ctrl-C test's stderr). Dask retries the
    transfer elsewhere and the peer's loss is reported where it happens, so it is one line
    at DEBUG here; any other failure of a transfer is still logged as Dask logs it.

    Likewise a heartbeat that fails on a closed connection: Dask logs "Failed to
    communicate with scheduler during heartbeat" with a traceback, and on a loaded machine
    a Ctrl-C'd run's workers did (seen in CI: the Ctrl-C test), their heartbeat cut off by
    the closing scheduler or by their own closing connection pool. The latter is one line
    at DEBUG; the former stays a WARNING, without the traceback, since it may as well be a
    scheduler lost mid-run (Dask reconnects or closes the worker after it either way)."""

    name = "imgtasks-quiet-hang-ups"

    def setup(self, worker: Any) -> None:
        logger = logging.getLogger("distributed.worker")
        for kind in (PeerHungUp, LostHeartbeat):
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())


def closed_comm_in(record: logging.LogRecord, message: str) -> CommClosedError | None:
    """The closed connection a Dask record with this message logs, if that is its error."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, CommClosedError) and str(record.msg).startswith(message):
        return error
    return None


class PeerHungUp(logging.Filter):
    """Turns "failed during get data" for a closed connection into a DEBUG line."""

    MESSAGE = "failed during get data"  # Worker.get_data's own words (a test checks them)

    def filter(self, record: logging.LogRecord) -> bool:
        error = closed_comm_in(record, self.MESSAGE)
        if error is not None:
            log.debug("a peer hung up during a transfer: %s", error)
            return False
        return True


class LostHeartbeat(logging.Filter):
    """A heartbeat's failure on a closed connection: a DEBUG line if the worker's own
    connection pool is closing, else a WARNING of one line (no traceback)."""

    MESSAGE = "Failed to communicate with scheduler during heartbeat"  # Worker.heartbeat's
    CLOSING = "ConnectionPool closing"  # ConnectionPool.connect's, once it is closing

    def filter(self, record: logging.LogRecord) -> bool:
        error = closed_comm_in(record, self.MESSAGE)
        if error is None:
            return True
        if str(error).startswith(self.CLOSING):
            log.debug("a closing worker's heartbeat did not go out: %s", error)
            return False
        # the record itself, changed in place: Dask's handlers still format it
        record.msg, record.args = f"{self.MESSAGE}: %s", (error,)
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        record.exc_info, record.exc_text = None, None
        return True


def memory_per_worker(settings: ClusterSettings, workers: int) -> int:
    """Split the machine's memory so the limits add up to no more than it."""
    return int(psutil.virtual_memory().total * settings.memory_fraction / workers)


def scheduler_spec(settings: ClusterSettings, security: Security | None = None) -> dict[str, Any]:
    options = {"host": settings.host, "dashboard_address": settings.dashboard_address}
    return {"cls": LateDashboardScheduler, "options": options | comm_options(security)}


class LateDashboardScheduler(Scheduler):
    """Dask's scheduler, its dashboard imported and attached when first asked for
    (``LateDashboard``); its HTTP server otherwise answers as ever (links, /health,
    /metrics). Made in one go on the cluster's loop, so no request comes in between."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs, dashboard=False)
        self.late_dashboard = LateDashboard(self)


class LateDashboard:
    """The Dask dashboard of a scheduler in this process, imported and attached when a
    dashboard page is first asked for.

    Dask imports the dashboard (bokeh) inside ``Scheduler()``: ~1.0 s of CPU, the longest
    import on the command line's path before anything else could start, and paid by every
    run whether or not anyone looks. Here the scheduler starts without it. The first
    request for any dashboard page (the job page's included) gets a page saying the
    dashboard is starting, which reloads itself each second, and starts a thread that
    imports the dashboard and attaches it on the scheduler's loop as ``Scheduler.__init__``
    would (``distributed.dashboard.scheduler.connect``); ~1-2 s later the reload finds it.
    What is served on the dashboard (the job page) is added with ``then``."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.attached: Future[None] = Future()
        self.started = False
        self._lock = threading.Lock()
        self.starting = tornado.web.Application([(r"/.*", DashboardStarting, {"late": self})])
        scheduler.http_application.add_application(self.starting)

    def start(self) -> None:
        """Import and attach the dashboard in a thread, once; return at once."""
        with self._lock:
            if self.started:
                return
            self.started = True
        threading.Thread(target=self._attach, name="imgtasks-dashboard", daemon=True).start()

    def _attach(self) -> None:
        try:
            import distributed.dashboard.scheduler as dashboard

            distributed.utils.sync(self.scheduler.loop, self._connect, dashboard)
        except BaseException as exc:  # the cluster closed first, or no bokeh
            log.debug("dashboard not attached: %s: %s", type(exc).__name__, exc)
            self.attached.set_exception(exc)
            return
        # The starting page answers until the steps given to ``then`` (the job page) ran:
        # every page appears at once.
        self.attached.set_result(None)
        with contextlib.suppress(Exception):  # closed meanwhile
            distributed.utils.sync(self.scheduler.loop, self._stop_starting_page)

    async def _connect(self, dashboard: Any) -> None:
        if self.scheduler.status not in (Status.init, Status.running):
            raise RuntimeError(f"the scheduler is {self.scheduler.status.name}")
        http = self.scheduler.http_application, self.scheduler.http_server
        dashboard.connect(*http, self.scheduler, prefix="/")  # Scheduler's default prefix

    async def _stop_starting_page(self) -> None:
        self.scheduler.http_application.applications.remove(self.starting)

    def then(self, step: Callable[[], None]) -> None:
        """Call ``step`` once the dashboard is attached (at once if it is), in the thread
        that attached it, before the starting page goes; never if it was not attached. A
        failing step is logged, not raised."""

        def run(attached: Future[None]) -> None:
            if attached.exception() is not None:
                return
            try:
                step()
            except Exception as exc:
                log.warning("%s after the dashboard: %s: %s", step, type(exc).__name__, exc)

        self.attached.add_done_callback(run)


class DashboardStarting(tornado.web.RequestHandler):
    """Any dashboard page before the dashboard is attached: starts attaching it, and
    answers 503 with a page that reloads itself (or says why there is no dashboard)."""

    def initialize(self, late: LateDashboard) -> None:
        self.late = late

    def get(self, *args: Any) -> None:
        self.late.start()
        self.set_status(503)
        self.set_header("Retry-After", "1")
        attached = self.late.attached
        if attached.done() and attached.exception() is not None:
            reason = tornado.escape.xhtml_escape(repr(attached.exception()))
            self.write(f"<html><body>No dashboard: {reason}</body></html>")
            return
        self.write(
            '<html><head><meta http-equiv="refresh" content="1"><title>Dask dashboard</title>'
            "</head><body>The dashboard is starting; this page reloads itself.</body></html>"
        )

    def head(self, *args: Any) -> None:  # a probe gets what GET gets, without the body
        self.get(*args)


def late_dashboard(scheduler: Any) -> LateDashboard | None:
    """The dashboard being attached to a scheduler of ours; None for any other."""
    return getattr(scheduler, "late_dashboard", None)


def exposure_warnings(settings: ClusterSettings) -> list[str]:
    """One line for each way a local cluster with these settings is open to others."""
    lines = []
    if settings.insecure:
        lines.append(
            f"--insecure: the scheduler accepts plain TCP on {settings.host} without "
            "credentials; anyone who can connect there (on 127.0.0.1: every user of this "
            "machine) can run code as you"
        )
    public = [  # Dask binds an address without a host (":8787") on every interface
        f"{a['address'] or '0.0.0.0'}:{a['port']}"
        for a in clean_dashboard_address(settings.dashboard_address)
        if not is_loopback(a["address"])
    ]
    if public:
        lines.append(
            f"the dashboard listens on {', '.join(public)}: anyone who can reach that address "
            "sees the cluster's tasks, workers and logs, without authentication"
        )
    return lines


def is_loopback(host: str) -> bool:
    """True for 127.x, ::1 and localhost; an empty host (all interfaces) or a name is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def start_local_cluster(
    settings: ClusterSettings, credentials: Security | None = None, *, wait: bool = True
) -> SpecCluster:
    """The local cluster the settings describe; ``credentials``: its own (None: made here,
    see ``security``), which ``Client(cluster)`` takes from the cluster. ``wait=False``:
    the scheduler alone; ``join_later`` brings the workers."""
    credentials = credentials or security(settings)
    log.info("starting a %s cluster", settings.kind)
    warm_worker_start(settings)
    for line in exposure_warnings(settings):
        log.warning(line)
    with dask.config.set(dict(QUIET_TIMERS_CONFIG)):  # the scheduler's timers
        return SpecCluster(
            workers=worker_specs(settings, credentials) if wait else {},
            scheduler=scheduler_spec(settings, credentials),
            security=credentials,  # the client's
            silence_logs=logging.WARNING,
            name=f"imgtasks-{settings.kind}",
        )


def join_later(cluster: SpecCluster, specs: Mapping[str, dict[str, Any]]) -> Future[None]:
    """Start the workers of ``specs`` in the background, all at once, and return at once.
    The future is done when all have joined (or the cluster began to close); its exception
    is the first start-up failure.

    All at once: each is forked from the preloaded fork server (~0.2-0.3 s of CPU to
    start). When workers were spawned (~1 s of imports each) the I/O worker went first,
    alone; forked, that order made a 30-image run x1.10 slower (6 interleaved pairs; 3000
    web-size images x1.00, the seed task x1.03).

    It is ``cluster.scale()`` (the spec updated, then SpecCluster's ``_correct_state`` on
    the cluster's loop), with the task kept: ``scale`` drops it, and with it the error of a
    worker that did not start. Closing the cluster meanwhile waits for the starting
    workers (the task holds the cluster's lock), then closes them."""

    async def join() -> None:
        if cluster.status != Status.running:  # closing: start none
            return
        cluster.worker_spec.update(specs)
        await cluster._correct_state()

    return asyncio.run_coroutine_threadsafe(join(), cluster.loop.asyncio_loop)


def local_cluster(settings: ClusterSettings | None = None) -> SpecCluster:
    """The local cluster ``settings`` describe (default: the hybrid one), for a client of
    your own: ``Client(imgtasks.local_cluster())``, then ``thumbnails(..., client=...)``."""
    settings = settings or ClusterSettings()
    if not settings.is_local:
        raise ValueError(f"{settings.kind!r} is not a local cluster kind: {LOCAL_KINDS}")
    # RUN_CONFIG for the scheduler's streams and the workers, which all start in here: the
    # scheduler's stream to a worker kept its last 1000 task messages (every batch's URLs)
    with run_config():
        return start_local_cluster(settings)


def connect(settings: ClusterSettings) -> tuple[Client, SpecCluster | None]:
    """A client on the cluster the settings name (and the cluster when we started it),
    once every local worker has joined (``connect_early``, then its wait)."""
    client, cluster, joining = connect_early(settings)
    if joining is not None:
        try:
            joining.joined.result()
        except BaseException:
            client.close()
            if cluster is not None:
                cluster.close()
            raise
    return client, cluster


@dataclass(frozen=True)
class Joining:
    """The workers of a local cluster the run started, still joining: what the run needs
    to know of them comes from their settings, without asking them."""

    settings: ClusterSettings
    joined: Future[None]  # see join_later

    @property
    def routes(self) -> bool:
        """Whether the cluster has an I/O pool and a CPU pool (``has_routing``)."""
        return self.settings.kind == "hybrid"

    @property
    def slots(self) -> tuple[int, int]:
        """(CPU slots, I/O slots) the workers will bring (``worker_slots``)."""
        return spec_slots(self.settings)

    def failure(self) -> BaseException | None:
        """Why a worker did not start; None while they are starting, or once all have."""
        if not self.joined.done() or self.joined.cancelled():
            return None
        return self.joined.exception()


def connect_early(settings: ClusterSettings) -> tuple[Client, SpecCluster | None, Joining | None]:
    """``connect``, but a local cluster's client comes as soon as its scheduler is up
    (~0.15 s: its dashboard comes later, ``LateDashboard``), and its workers join while the
    run sets up and submits: ~1 s of forking and starting. A task that needs the ``io`` or
    ``cpu`` resource waits in the scheduler until a worker that has it joins."""
    credentials = security(settings)
    if settings.is_remote:
        return remote_client(settings, credentials), None, None
    cluster = start_local_cluster(settings, credentials, wait=False)
    try:
        # The client first: spawning the workers keeps the cluster's loop busy, and a
        # client connecting meanwhile waited 1.0-2.9 s for it (0.02 s before). Results
        # straight from the workers that hold them, not relayed by the scheduler: our own
        # workers are always reachable from here.
        client = Client(cluster, direct_to_workers=True)
        joining = Joining(settings, join_later(cluster, worker_specs(settings, credentials)))
    except BaseException:
        cluster.close()
        raise
    return client, cluster, joining


def remote_client(settings: ClusterSettings, credentials: Security) -> Client:
    """A client on a running cluster; a TLS setting the scheduler does not accept is a
    one-line SetupError."""
    if settings.scheduler_file is not None:
        target = {"scheduler_file": settings.scheduler_file}
        label = f"--scheduler-file {settings.scheduler_file}"
    else:
        target, label = {"address": settings.kind}, f"--scheduler {settings.kind}"
    try:
        return Client(**target, timeout="30s", security=credentials)
    except Exception as exc:
        refused = preflight.tls_refusal(exc, label)
        if refused is None:
            raise
        raise refused from exc


def worker_resources(client: Client) -> list[dict[str, float]]:
    """The resources of every worker of the cluster."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return [dict(w.get("resources") or {}) for w in workers]


def spec_slots(settings: ClusterSettings) -> tuple[int, int]:
    """(CPU slots, I/O slots) of a local cluster: ``worker_slots`` of its workers."""
    specs = worker_specs(settings)
    return _slots((s["options"]["nthreads"], s["options"]["resources"]) for s in specs.values())


def worker_slots(client: Client) -> tuple[int, int]:
    """(CPU slots, I/O slots) of the cluster's workers: the threads of the workers without
    an I/O resource, and the I/O resource's amount (0: no I/O pool)."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return _slots((w.get("nthreads", 1), w.get("resources") or {}) for w in workers)


def _slots(workers: Iterable[tuple[int, Mapping[str, float]]]) -> tuple[int, int]:
    cpu = io = 0
    for nthreads, resources in workers:
        io += int(resources.get(IO_RESOURCE, 0))
        cpu += 0 if IO_RESOURCE in resources else nthreads
    return cpu, io


def has_routing(client: Client) -> bool:
    """True when the cluster has both an I/O and a CPU pool to route stages to."""
    resources = worker_resources(client)
    has_io = any(r.get(IO_RESOURCE, 0) >= 1 for r in resources)
    has_cpu = any(r.get(CPU_RESOURCE, 0) >= 1 for r in resources)
    return has_io and has_cpu


def workers_without_file(client: Client, output: OutputSettings, relpath: str) -> list[str]:
    """The workers on which ``relpath`` under ``output`` does not exist, each resolving the
    output as its tasks would (a local path: on its own host's disk and working directory)."""
    found = client.run(file_exists, output, relpath)
    return sorted(address for address, exists in found.items() if not exists)
