"""flows/run.py against a real multi-process Dask cluster started with the ``dask`` CLI.

Everything listens on 127.0.0.1 on free ports, over TLS with certificates the test makes
(README: "Run on a cluster"): a ``dask scheduler`` process, an I/O worker process
(``--resources io=8``) and one ``dask worker --nworkers 2`` command with two
single-threaded CPU processes (``--resources cpu=1``). The flow connects by address and by
scheduler file; where each task ran is read back from the scheduler's task stream.
A second cluster whose workers declare no resources shows the fallback: the run completes
and says that stages run anywhere. Clients without the cluster's certificates are refused,
each with one line that says why.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from certs import Pem, make_ca, make_cert
from conftest import (
    client_refused,
    free_port,
    one_line_error,
    run_flow,
    subprocess_environment,
    thumbnail_files,
    tls_handshake_error,
)
from distributed import Client
from distributed.security import Security

NOTE = "note: the cluster's workers have no io/cpu resources"
URL_COUNT = 24
BATCH_SIZE = 4


def dask_cli() -> list[str]:
    """The ``dask`` command of this interpreter's environment."""
    exe = Path(sys.executable).with_name("dask")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "dask"]


@dataclass(frozen=True)
class Credentials:
    """A cluster's CA, the certificate its scheduler and workers share, and a client's."""

    ca: Pem
    node: Pem
    client: Pem

    def security(self) -> Security:
        return Security(
            tls_ca_file=str(self.ca.cert),
            tls_client_cert=str(self.client.cert),
            tls_client_key=str(self.client.key),
        )


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    certs = tmp_path_factory.mktemp("certs")
    ca = make_ca(certs)
    return Credentials(ca, make_cert(certs, "node", ca), make_cert(certs, "client", ca))


@dataclass
class Cluster:
    """Scheduler and worker processes started by a test; their logs go to files."""

    workdir: Path
    credentials: Credentials
    address: str = ""
    scheduler_file: Path | None = None
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            [*dask_cli(), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=subprocess_environment(),
            cwd=self.workdir,
            start_new_session=True,  # a Ctrl-C of pytest does not reach them; stop() does
        )
        log.close()  # the child holds its own descriptor
        self.procs.append((name, proc))

    def start_scheduler(self) -> None:
        port = free_port()
        self.address = f"tls://127.0.0.1:{port}"
        self.scheduler_file = self.workdir / "scheduler.json"
        self.start(
            "scheduler",
            [
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                f"127.0.0.1:{free_port()}",
                "--scheduler-file",
                str(self.scheduler_file),
                *self.credentials.node.flags(self.credentials.ca),
            ],
        )

    def start_workers(self, name: str, *options: str) -> None:
        self.start(
            name,
            [
                "worker",
                self.address,
                "--name",
                name,
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--local-directory",
                str(self.workdir / "scratch"),
                "--death-timeout",
                "60",
                *self.credentials.node.flags(self.credentials.ca),
                *options,
            ],
        )

    def client(self, timeout: float = 60) -> Client:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                return Client(self.address, timeout="5s", security=self.credentials.security())
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        """Until ``n`` workers joined (0: until the scheduler takes a client)."""
        with self.client() as client:
            if n == 0:
                return
            try:
                client.wait_for_workers(n, timeout=timeout)
            except TimeoutError:
                raise AssertionError(f"fewer than {n} workers connected\n{self.logs()}") from None

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for name, _ in self.procs:
            text = (self.workdir / f"{name}.log").read_text(errors="replace")
            out.append(f"--- {name}.log (tail)\n{text[-2000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        # workers first, so they do not spend the time-out reconnecting to a dead scheduler
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


@contextlib.contextmanager
def running_cluster(
    workdir: Path, credentials: Credentials, routed: bool | None
) -> Iterator[Cluster]:
    """A scheduler and workers with (``routed``) or without io/cpu resources; None: the
    scheduler alone."""
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(workdir, credentials)
    try:
        cluster.start_scheduler()
        if routed:
            cluster.start_workers(
                "io", "--nthreads", "8", "--resources", "io=8", "--memory-limit", "2GiB"
            )
            cluster.start_workers(
                "cpu",
                "--nworkers",
                "2",
                "--nthreads",
                "1",
                "--resources",
                "cpu=1",
                "--memory-limit",
                "1GiB",
            )
        elif routed is False:
            cluster.start_workers(
                "plain", "--nworkers", "2", "--nthreads", "2", "--memory-limit", "1GiB"
            )
        cluster.wait_for_workers({True: 3, False: 2, None: 0}[routed])
        yield cluster
    finally:
        cluster.stop()


def check_outputs(out: Path, urls: list[str], proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    df = pd.read_parquet(out / "manifest").sort_values("index").reset_index(drop=True)
    assert list(df["url"]) == urls  # one row per URL, in input order
    assert list(df["index"]) == list(range(len(urls)))
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"][["url", "status", "error"]]
    assert ((df["width"] > 0) & (df["width"] <= 128) & (df["height"] <= 128)).all()
    files = thumbnail_files(out)
    assert files == set(df["path"])
    assert all((out / p).stat().st_size > 0 for p in files)


def where_tasks_ran(client: Client, start_index: int) -> dict[str, list[str]]:
    """Stage ("download"/"thumbnail") -> the worker name of each of its task records
    in the scheduler's task stream since ``start_index``."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    names = {address: str(info["name"]) for address, info in workers.items()}
    ran: dict[str, list[str]] = {}
    for record in client.get_task_stream()[start_index:]:
        stage = str(record["key"]).split("-", 1)[0]
        ran.setdefault(stage, []).append(names.get(record["worker"], record["worker"]))
    return ran


DEMO_NOTE = "workers on other hosts cannot reach it"


@pytest.fixture(scope="module")
def url_list(tmp_path_factory: pytest.TempPathFactory, demo_server) -> tuple[Path, list[str]]:
    urls = demo_server.urls(URL_COUNT)
    listing = tmp_path_factory.mktemp("urls") / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    return listing, urls


@pytest.mark.timeout(150)
def test_resource_routed_cluster_by_address_and_scheduler_file(
    tmp_path: Path, url_list: tuple[Path, list[str]], credentials: Credentials
) -> None:
    listing, urls = url_list
    tls = credentials.client.flags(credentials.ca)
    with (
        running_cluster(tmp_path / "cluster", credentials, routed=True) as cluster,
        cluster.client() as client,
    ):
        client.get_task_stream()  # installs the scheduler's task-stream recorder
        connections = {
            "address": ["--scheduler", cluster.address],
            "scheduler-file": ["--scheduler-file", str(cluster.scheduler_file)],
        }
        for how, connect in connections.items():
            out = tmp_path / f"out-{how}"
            start_index = len(client.get_task_stream())
            proc = run_flow(
                [
                    *connect,
                    *tls,
                    "--urls",
                    str(listing),
                    "--out",
                    str(out),
                    "--batch-size",
                    str(BATCH_SIZE),
                ],
                cwd=tmp_path,
            )
            check_outputs(out, urls, proc)
            assert NOTE not in proc.stdout, how
            assert "dashboard: http://127.0.0.1:" in proc.stdout

            ran = where_tasks_ran(client, start_index)
            batches = URL_COUNT // BATCH_SIZE
            assert len(ran.get("download", [])) >= batches, (how, ran)
            assert len(ran.get("thumbnail", [])) >= batches, (how, ran)
            assert set(ran["download"]) == {"io"}, (how, ran)
            assert set(ran["thumbnail"]) <= {"cpu-0", "cpu-1"}, (how, ran)
        cluster.check_alive()


@pytest.mark.timeout(120)
def test_cluster_without_resources_still_completes(
    tmp_path: Path, url_list: tuple[Path, list[str]], credentials: Credentials
) -> None:
    listing, urls = url_list
    tls = credentials.client.flags(credentials.ca)
    with running_cluster(tmp_path / "cluster", credentials, routed=False) as cluster:
        out = tmp_path / "out"
        proc = run_flow(
            ["--scheduler", cluster.address, *tls, "--urls", str(listing), "--out", str(out)],
            cwd=tmp_path,
        )
        check_outputs(out, urls, proc)
        assert NOTE in proc.stdout
        assert DEMO_NOTE not in proc.stderr
        # The demo source on a cluster: warned that other hosts cannot reach it (these
        # workers share the host, so the run still completes).
        demo_out = tmp_path / "out-demo"
        proc = run_flow(
            [
                *("--scheduler", cluster.address, *tls, "--count", "8"),
                *("--latency", "0", "--out", str(demo_out)),
            ],
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert DEMO_NOTE in proc.stderr
        assert len(pd.read_parquet(demo_out / "manifest")) == 8
        cluster.check_alive()


@pytest.mark.timeout(120)
def test_clients_without_the_cluster_certificates_are_refused(
    tmp_path: Path, url_list: tuple[Path, list[str]], credentials: Credentials
) -> None:
    listing, _ = url_list
    strangers = make_ca(tmp_path / "other", "other-ca")  # a CA the cluster does not trust
    stranger = make_cert(tmp_path / "other", "stranger", strangers)
    ca = credentials.ca
    with running_cluster(tmp_path / "cluster", credentials, routed=None) as cluster:
        plain = cluster.address.replace("tls://", "tcp://")
        stranger_security = Security(tls_ca_file=str(ca.cert), **as_client(stranger))
        assert client_refused(cluster.address)
        assert client_refused(plain)
        assert client_refused(cluster.address, stranger_security)
        assert tls_handshake_error(cluster.address)

        # the same through flows/run.py: one line each, exit 2
        cases = {
            "no certificates": (["--scheduler", cluster.address], "speaks TLS: give --tls-ca-file"),
            "tcp:// to TLS": (
                ["--scheduler", plain],
                "closed the connection: if it speaks TLS, give its tls:// address",
            ),
            "another CA's client certificate": (
                ["--scheduler", cluster.address, *stranger.flags(credentials.ca)],
                "trust this client's certificate",
            ),
            "another CA": (
                ["--scheduler", cluster.address, *credentials.client.flags(strangers)],
                "not signed by the CA given",
            ),
        }
        for case, (connect, reason) in cases.items():
            proc = run_flow([*connect, "--urls", str(listing), "--out", str(tmp_path / "out")])
            line = one_line_error(proc)
            assert proc.returncode == 2, (case, proc.stderr)
            assert reason in line, (case, line)
        cluster.check_alive()


def as_client(pem: Pem) -> dict[str, str]:
    return {"tls_client_cert": str(pem.cert), "tls_client_key": str(pem.key)}
