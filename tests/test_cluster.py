from __future__ import annotations

import datetime
import gc
import inspect
import logging
import os
import sys
import threading
import time
from pathlib import Path

import dask
import distributed.core
import distributed.worker
import psutil
import pytest
import requests
import yaml
from conftest import client_refused, tls_handshake_error
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from distributed import Client, Nanny
from distributed.comm.core import CommClosedError

import imgtasks
from imgtasks import workerstart
from imgtasks.cluster import (
    DASK_MONITOR_SAMPLES,
    MONITOR_KEY,
    MONITOR_SAMPLES,
    ClusterSettings,
    LateDashboard,
    LateDashboardScheduler,
    LostHeartbeat,
    PeerHungUp,
    QuickExit,
    connect_early,
    exposure_warnings,
    has_routing,
    pre_spawn_environ,
    scheduler_spec,
    security,
    spawn_config,
    start_local_cluster,
    worker_resources,
    worker_slots,
    worker_specs,
)


def test_hybrid_spec_has_an_io_pool_and_cpu_pool() -> None:
    specs = worker_specs(ClusterSettings(kind="hybrid", io_threads=24, cpu_workers=3))
    assert sorted(specs) == ["cpu-0", "cpu-1", "cpu-2", "io"]
    io = specs["io"]["options"]
    assert issubclass(specs["io"]["cls"], Nanny)
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
        "cls": LateDashboardScheduler,
        "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:8787"},
    }
    for spec in worker_specs(settings).values():
        assert spec["options"]["host"] == "127.0.0.1"
        assert spec["options"]["dashboard_address"].startswith("127.0.0.1:")
    assert exposure_warnings(settings) == []


def test_local_clusters_speak_tls_with_one_temporary_ca() -> None:
    settings = ClusterSettings()
    credentials = security(settings)
    assert credentials.require_encryption and "BEGIN CERTIFICATE" in credentials.tls_ca_file
    options = [scheduler_spec(settings, credentials)["options"]]
    options += [spec["options"] for spec in worker_specs(settings, credentials).values()]
    for option in options:
        assert option["protocol"] == "tls://" and option["security"] is credentials
    assert security(settings).tls_ca_file != credentials.tls_ca_file  # a new CA per run


def test_the_temporary_ca_is_one_p256_certificate_for_every_role() -> None:
    credentials = security(ClusterSettings())
    cert = x509.load_pem_x509_certificate(credentials.tls_ca_file.encode())
    key = serialization.load_pem_private_key(credentials.tls_scheduler_key.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert cert.public_key() == key.public_key() and cert.issuer == cert.subject
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= datetime.timedelta(days=365)
    for role in ("client", "scheduler", "worker"):
        assert getattr(credentials, f"tls_{role}_cert") == credentials.tls_ca_file
        assert getattr(credentials, f"tls_{role}_key") == credentials.tls_scheduler_key


def test_insecure_is_plain_tcp_and_says_so() -> None:
    settings = ClusterSettings(insecure=True)
    credentials = security(settings)
    assert not credentials.require_encryption
    assert scheduler_spec(settings, credentials)["options"]["protocol"] == "tcp://"
    (line,) = exposure_warnings(settings)
    assert line.startswith("--insecure: ") and "run code as you" in line


@pytest.mark.parametrize(
    ("address", "shown"),
    [(":8787", "0.0.0.0:8787"), ("0.0.0.0:0", "0.0.0.0:0"), ("10.1.2.3:8787", "10.1.2.3:8787")],
)
def test_a_dashboard_off_loopback_says_who_can_see_it(address: str, shown: str) -> None:
    (line,) = exposure_warnings(ClusterSettings(dashboard_address=address))
    assert f"listens on {shown}: anyone who can reach that address" in line
    assert "without authentication" in line and "\n" not in line


@pytest.mark.parametrize("address", ["127.0.0.1:8787", "localhost:0", "127.0.0.2:0"])
def test_a_loopback_dashboard_says_nothing(address: str) -> None:
    assert exposure_warnings(ClusterSettings(dashboard_address=address)) == []


def test_remote_credentials_from_settings_or_dask_config(tmp_path) -> None:
    settings = ClusterSettings(kind="tls://10.0.0.1:8786", tls_ca_file="ca.pem", tls_cert="c.pem")
    with dask.config.set({"distributed.comm.tls.client.key": "from-config.pem"}):
        assert settings.tls_files() == {
            "tls_ca_file": ("--tls-ca-file", "ca.pem"),
            "tls_cert": ("--tls-cert", "c.pem"),
            "tls_key": ("distributed.comm.tls.client.key", "from-config.pem"),
        }
        credentials = security(settings)
    assert credentials.tls_ca_file == "ca.pem" and credentials.tls_client_cert == "c.pem"
    assert credentials.tls_client_key == "from-config.pem"
    with dask.config.set({"distributed.comm.tls.ca-file": "config-ca.pem"}):
        from_config = security(ClusterSettings(kind="tls://10.0.0.1:8786"))
    assert from_config.tls_ca_file == "config-ca.pem"


def test_processes_and_threads_shapes() -> None:
    procs = worker_specs(ClusterSettings(kind="processes", cpu_workers=2))
    assert [s["options"]["nthreads"] for s in procs.values()] == [1, 1]
    assert all(s["options"]["resources"] == {} for s in procs.values())
    threads = worker_specs(ClusterSettings(kind="threads", cpu_workers=2))
    assert len(threads) == 1 and next(iter(threads.values()))["options"]["nthreads"] >= 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "bogus"},
        {"io_threads": 0},
        {"cpu_workers": 0},
        {"memory_fraction": 1.5},
        {"kind": "hybrid", "tls_cert": "client.pem"},  # local clusters make their own
        {"kind": "tls://10.0.0.1:8786", "insecure": True},
    ],
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
    # The flow's way: the client once the scheduler is up, the workers joining meanwhile
    # (they are created on the cluster's loop: the spawn config must reach them there too).
    client, cluster, joining = connect_early(settings)
    try:
        assert joining is not None
        joining.joined.result(timeout=60)
        assert joining.failure() is None and len(client.scheduler_info()["workers"]) == 3
        assert worker_slots(client) == joining.slots == (2, 4) and joining.routes
        assert sorted(map(sorted, (r.items() for r in worker_resources(client)))) == sorted(
            [[("io", 4.0)], [("cpu", 1.0)], [("cpu", 1.0)]]
        )
        assert has_routing(client)
        # TLS with this run's own CA: a client without it, or a bare TLS handshake without a
        # client certificate, is turned away; the dashboard stays plain HTTP on loopback
        assert cluster is not None and cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert client_refused(cluster.scheduler_address)
        assert client_refused(cluster.scheduler_address.replace("tls://", "tcp://"))
        assert tls_handshake_error(cluster.scheduler_address)
        assert client.dashboard_link.startswith("http://127.0.0.1:")

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
        # pyarrow's mimalloc keeps a heap per thread: the I/O worker's memory grew with them
        pools = client.run(lambda: __import__("pyarrow").default_memory_pool().backend_name)
        assert set(pools.values()) == {"system"}
        # Dask's profiler calls sys._current_frames(), which deadlocks on CPython 3.11
        profiling = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
        assert set(profiling.values()) == {sys.version_info >= (3, 12)}
        # housekeeping timers slowed down (an idle cluster burnt ~5 % of 2 cores), in the
        # workers and the scheduler; results come straight from the workers
        ticks = client.run(lambda dask_worker: dask_worker.periodic_callbacks["tick"].callback_time)
        assert set(ticks.values()) == {500}
        tick = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.periodic_callbacks["tick"].callback_time
        )
        assert tick == 500
        memory = client.run(lambda dask_worker: dask_worker.memory_manager.memory_monitor_interval)
        assert set(memory.values()) == {0.5}
        assert client.direct_to_workers is True
        # and they exit without the interpreter's last garbage collections (QuickExit)
        quick = client.run(lambda dask_worker: QuickExit.name in dask_worker.plugins)
        assert set(quick.values()) == {True}
        # a peer hanging up mid-transfer (a Ctrl-C) is not an ERROR with a traceback
        # nor is a lost heartbeat: gone if the worker closes, else a warning of one line
        heard = client.run(_logged_by_worker)
        lost = f"WARNING {LostHeartbeat.MESSAGE}: Stream is closed None"
        failed = f"ERROR {PeerHungUp.MESSAGE} with tls://a -> None OSError"
        assert [*heard.values()] == [[lost, failed]] * 3
        # the filters match Dask's texts: a Dask that rewords them must fail here
        assert PeerHungUp.MESSAGE in inspect.getsource(distributed.worker.Worker.get_data)
        heartbeat = inspect.getsource(distributed.worker.Worker.heartbeat)
        assert LostHeartbeat.MESSAGE in heartbeat
        pool = inspect.getsource(distributed.core.ConnectionPool)
        assert f'"{LostHeartbeat.CLOSING}.' in pool
        # forked from the fork server, which imported their stages once for all of them
        started = client.run(_how_started)
        assert {parent for parent, _, _ in started.values()} != {os.getpid()}
        assert len({parent for parent, _, _ in started.values()}) == 1
        assert set(started.values()) == {(next(iter(started.values()))[0], "6640", True)}
    finally:
        client.close()
        assert cluster is not None
        cluster.close()


def _logged_by_worker() -> list[str]:
    """Which failures ``distributed.worker`` passes on, logged as Dask logs them: a
    heartbeat on a closing pool and on a closed stream (Worker.heartbeat), then a peer
    that hung up and a local error (Worker.get_data)."""

    logger = logging.getLogger("distributed.worker")
    heard: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: heard.append(  # type: ignore
        f"{record.levelname} {record.getMessage()} "
        f"{type(record.exc_info[1]).__name__ if record.exc_info else None}"
    )
    logger.addHandler(handler)
    try:
        for error in (
            CommClosedError("ConnectionPool closing."),
            CommClosedError("Stream is closed"),
        ):
            try:
                raise error
            except OSError:
                logger.exception(LostHeartbeat.MESSAGE + ".")
        for error in (CommClosedError("Stream is closed"), OSError("disk full")):
            try:
                raise error
            except OSError:
                logger.exception(PeerHungUp.MESSAGE + " with %s -> %s", "tls://a", None)
    finally:
        logger.removeHandler(handler)
    return heard


def _worker_name() -> str:
    from distributed import get_worker

    return str(get_worker().name)


def _message_log_lengths(client: Client) -> tuple[set[int], set[int]]:
    """How many messages the workers' streams and the scheduler's streams to the workers
    keep (Dask's debug log of recent messages; each to a worker holds its batch's URLs)."""
    workers = client.run(lambda dask_worker: dask_worker.batched_stream.recent_message_log.maxlen)
    scheduler = client.run_on_scheduler(
        lambda dask_scheduler: [
            stream.recent_message_log.maxlen for stream in dask_scheduler.stream_comms.values()
        ]
    )
    assert workers and scheduler
    return set(workers.values()), set(scheduler)


@pytest.mark.timeout(120)
def test_run_config_keeps_no_message_log_anywhere() -> None:
    """Within ``run_config`` (a run on a client of ours) no connection keeps a log."""
    from imgtasks.cluster import run_config

    settings = ClusterSettings(
        kind="hybrid", io_threads=2, cpu_workers=1, dashboard_address="127.0.0.1:0"
    )
    with run_config():
        client, cluster, joining = connect_early(settings)
        try:
            assert joining is not None
            joining.joined.result(timeout=60)
            client.wait_for_workers(2, timeout=60)
            assert _message_log_lengths(client) == ({0}, {0})
            assert client.scheduler_comm.recent_message_log.maxlen == 0
            assert _monitor_lengths(client) == {MONITOR_SAMPLES}
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


def _monitor_lengths(client: Client) -> set[int]:
    """How many samples the scheduler's and the workers' system monitors keep."""
    workers = client.run(lambda dask_worker: dask_worker.monitor.maxlen)
    scheduler = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.monitor.maxlen)
    return {scheduler, *workers.values()}


def test_the_system_monitor_keeps_ten_minutes_unless_the_user_said_otherwise() -> None:
    from imgtasks.cluster import run_config

    shipped = yaml.safe_load((Path(distributed.__file__).parent / "distributed.yaml").read_text())
    assert shipped["distributed"]["admin"]["system-monitor"]["log-length"] == 7200
    assert DASK_MONITOR_SAMPLES == 7200
    with run_config():
        assert dask.config.get(MONITOR_KEY) == MONITOR_SAMPLES
    with dask.config.set({MONITOR_KEY: 500}), run_config():
        assert dask.config.get(MONITOR_KEY) == 500  # the user's own length
    assert dask.config.get(MONITOR_KEY) == DASK_MONITOR_SAMPLES


@pytest.mark.timeout(120)
def test_a_cluster_for_your_own_client_keeps_no_message_log() -> None:
    """``Client(imgtasks.local_cluster())``, outside any config block of ours: the
    scheduler and the workers still keep none (each stream kept its last 1000 before)."""
    settings = ClusterSettings(
        kind="hybrid", io_threads=2, cpu_workers=1, dashboard_address="127.0.0.1:0"
    )
    users = dask.config.get("distributed.admin.low-level-log-length")
    assert users > 0
    with imgtasks.local_cluster(settings) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        assert _message_log_lengths(client) == ({0}, {0})
        assert client.scheduler_comm.recent_message_log.maxlen == users  # the user's own
        assert _monitor_lengths(client) == {MONITOR_SAMPLES}
    assert dask.config.get("distributed.admin.low-level-log-length") == users


def _key_cache_size() -> int:
    from dask.utils import key_split

    return key_split.cache_info().currsize


@pytest.mark.timeout(180)
def test_dask_keeps_only_recent_task_keys_over_a_run_of_many_batches(
    tmp_path: Path, demo_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dask's ``key_split`` cache keeps every task key it is sent, up to 100,000; ours are
    unique per batch, so it grew with the URL list in the scheduler (in the client's
    process here) and in each worker. 400 batches make ~800 keys; cleared every 25
    batches, each process holds only the keys since the last clear and those in flight."""
    from imgtasks import keycache

    monkeypatch.setattr(keycache, "CLEAR_EVERY", 25)
    settings = ClusterSettings(
        kind="hybrid", io_threads=2, cpu_workers=1, dashboard_address="127.0.0.1:0"
    )
    with imgtasks.local_cluster(settings) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        result = imgtasks.thumbnails(
            demo_server.urls(400, kind="tiny"),
            tmp_path / "out",
            client=client,
            batch_size=1,
            window=8,
            progress=False,
            job_page=False,
        )
        assert result.batches == 400 and result.counts == {"ok": 400}
        workers = client.run(_key_cache_size)
        scheduler = client.run_on_scheduler(_key_cache_size)
    assert len(workers) == 2
    assert scheduler < 200 and max(workers.values()) < 200, (scheduler, workers)


def _how_started() -> tuple[int, str | None, bool]:
    """A worker's parent process, hash seed, and whether our stages were there at start,
    frozen out of its garbage collections by the fork server (imgtasks.forkserverpreload),
    whose collector was off only while it imported them."""
    preloaded = "imgtasks.nodes" in sys.modules and gc.get_freeze_count() > 0
    return os.getppid(), os.environ.get("PYTHONHASHSEED"), preloaded and gc.isenabled()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH is Python 3.11+")
def test_workers_import_what_the_client_imports_wherever_it_was_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fork server is `python -c`, whose path starts with the current directory: a
    stale `imgtasks/` there must not be what the workers run."""
    decoy = tmp_path / "imgtasks"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("DECOY = True\n")
    monkeypatch.chdir(tmp_path)
    workerstart.stop_fork_server()  # a server started elsewhere would hide the question
    cluster = start_local_cluster(ClusterSettings(cpu_workers=1, io_threads=2))
    try:
        with distributed.Client(cluster, security=cluster.security) as client:
            client.wait_for_workers(2, timeout=60)
            where = client.run(lambda: sys.modules["imgtasks"].__file__)
            assert set(where.values()) == {imgtasks.__file__}
            started = client.run(_how_started).values()  # preloaded by the fork server
            assert {(seed, preloaded) for _, seed, preloaded in started} == {("6640", True)}
    finally:
        cluster.close()
        workerstart.stop_fork_server()  # the next test's server starts outside tmp_path


def test_the_command_lines_fork_server_starts_as_a_nanny_would_start_a_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """flows/run.py starts the fork server before Dask's config can be read: its fixed
    environment must be what cluster.pre_spawn_environ reads from Dask's config."""
    for name in workerstart.DEFAULT_ENVIRON:
        monkeypatch.delenv(name, raising=False)
    with dask.config.set(spawn_config(ClusterSettings())):
        assert pre_spawn_environ() == workerstart.default_environ()


@pytest.mark.parametrize(
    ("argv", "started"),
    [
        ([], True),
        (["--scheduler", "processes", "--count", "10"], True),
        (["--scheduler=threads"], True),
        (["--scheduler", "sync"], False),
        (["--scheduler", "tls://10.0.0.1:8786"], False),
        (["--scheduler-file", "s.json"], False),
        (["--help"], False),
    ],
)
def test_the_command_line_starts_the_fork_server_only_for_local_workers(
    argv: list[str], started: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(workerstart, "start_fork_server", calls.append)
    workerstart.start_for_command_line(argv)
    assert bool(calls) == started


@pytest.mark.timeout(120)
def test_the_dashboard_is_imported_when_first_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler listens without its dashboard, and nothing imports it until a page is
    asked for: that request answers 503 with a page that reloads itself and starts the
    import; its other routes answer as ever; then the dashboard itself, after what waited
    for it (``then``)."""
    gate = threading.Event()
    attach = LateDashboard._attach

    def held(self: LateDashboard) -> None:
        gate.wait(60)
        attach(self)

    monkeypatch.setattr(LateDashboard, "_attach", held)
    settings = ClusterSettings(cpu_workers=1, io_threads=2, dashboard_address="127.0.0.1:0")
    cluster = start_local_cluster(settings, wait=False)
    try:
        link = cluster.dashboard_link
        late = cluster.scheduler.late_dashboard
        assert requests.get(link.replace("/status", "/health"), timeout=10).text == "ok"
        assert not late.started  # nobody asked for a page
        ran = threading.Event()
        late.then(ran.set)
        assert not late.started and not ran.is_set()
        probe = requests.head(link, timeout=10)
        assert (probe.status_code, probe.headers["Retry-After"], probe.content) == (503, "1", b"")
        assert late.started
        starting = requests.get(link, timeout=10)
        assert starting.status_code == 503 and "starting" in starting.text
        assert 'http-equiv="refresh"' in starting.text
        assert late.started
        gate.set()
        late.attached.result(timeout=60)
        assert ran.wait(10)
        deadline = time.monotonic() + 30
        while (page := requests.get(link, timeout=10)).status_code == 503:
            assert time.monotonic() < deadline, "the starting page stayed"
            time.sleep(0.05)
        assert page.status_code == 200 and "bokeh" in page.text.lower()
    finally:
        gate.set()
        cluster.close()
