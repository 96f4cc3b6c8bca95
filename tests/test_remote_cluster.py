"""flows/run.py against a real multi-process Dask cluster started with the ``dask`` CLI.

Everything listens on 127.0.0.1 on free ports: a ``dask scheduler`` process, an I/O worker
process (``--resources io=8``) and one ``dask worker --nworkers 2`` command with two
single-threaded CPU processes (``--resources cpu=1``). The flow connects by address and by
scheduler file; where each task ran is read back from the scheduler's task stream.
A second cluster whose workers declare no resources shows the fallback: the run completes
and says that stages run anywhere.
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
from conftest import free_port, run_flow, subprocess_environment, thumbnail_files
from distributed import Client

NOTE = "note: the cluster's workers have no io/cpu resources"
URL_COUNT = 24
BATCH_SIZE = 4


def dask_cli() -> list[str]:
    """The ``dask`` command of this interpreter's environment."""
    exe = Path(sys.executable).with_name("dask")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "dask"]


@dataclass
class Cluster:
    """Scheduler and worker processes started by a test; their logs go to files."""

    workdir: Path
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
        self.address = f"tcp://127.0.0.1:{port}"
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
                *options,
            ],
        )

    def client(self, timeout: float = 60) -> Client:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                return Client(self.address, timeout="5s")
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        with self.client() as client:
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
def running_cluster(workdir: Path, routed: bool) -> Iterator[Cluster]:
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(workdir)
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
        else:
            cluster.start_workers(
                "plain", "--nworkers", "2", "--nthreads", "2", "--memory-limit", "1GiB"
            )
        cluster.wait_for_workers(3 if routed else 2)
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
    tmp_path: Path, url_list: tuple[Path, list[str]]
) -> None:
    listing, urls = url_list
    with running_cluster(tmp_path / "cluster", routed=True) as cluster, cluster.client() as client:
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
    tmp_path: Path, url_list: tuple[Path, list[str]]
) -> None:
    listing, urls = url_list
    with running_cluster(tmp_path / "cluster", routed=False) as cluster:
        out = tmp_path / "out"
        proc = run_flow(
            ["--scheduler", cluster.address, "--urls", str(listing), "--out", str(out)],
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
                *("--scheduler", cluster.address, "--count", "8"),
                *("--latency", "0", "--out", str(demo_out)),
            ],
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert DEMO_NOTE in proc.stderr
        assert len(pd.read_parquet(demo_out / "manifest")) == 8
        cluster.check_alive()
