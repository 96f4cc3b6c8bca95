"""Infrastructure faults: a CPU worker process killed mid-run; the run still completes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import free_port, start_flow
from PIL import Image

from imgtasks.demo import DemoServer, ServerSettings

N_URLS = 120
BATCH = 4


@pytest.fixture(scope="module")
def slow_server() -> Iterator[DemoServer]:
    with DemoServer(ServerSettings(latency=0.25, jitter=0.0)) as server:
        yield server


def tcp_connections(proc: psutil.Process) -> list:
    with contextlib.suppress(psutil.Error):
        return proc.net_connections(kind="tcp")
    return []


def cpu_worker_pids(flow: psutil.Process, demo_port: int) -> list[int]:
    """The CPU worker processes of the flow's hybrid cluster.

    Worker processes are the flow's children that listen on a TCP port; the I/O worker is
    the one holding (pooled) connections to the demo server, CPU workers never talk to it.
    (The scheduler's /json/identity.json would name them, but distributed 2026.8 answers
    it with a 500 once workers report metrics with tuple keys.)
    """
    found = []
    for child in flow.children(recursive=True):
        conns = tcp_connections(child)
        listens = any(c.status == psutil.CONN_LISTEN for c in conns)
        downloads = any(c.raddr and c.raddr.port == demo_port for c in conns)
        if listens and not downloads:
            found.append(child.pid)
    return sorted(found)


def busiest(pids: Iterable[int], interval: float = 0.2) -> int:
    """The process that used the most CPU over ``interval``: likely mid-thumbnail."""
    procs = [psutil.Process(pid) for pid in pids]
    before = [sum(p.cpu_times()[:2]) for p in procs]
    time.sleep(interval)
    used = [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before, strict=True)]
    return procs[used.index(max(used))].pid


@pytest.mark.timeout(300)
def test_killed_cpu_worker_is_replaced_and_the_run_completes(
    tmp_path: Path, slow_server: DemoServer
) -> None:
    urls = slow_server.urls(N_URLS)
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    out = tmp_path / "out"
    dashboard = free_port()
    proc = start_flow(
        [
            "--urls",
            str(listing),
            "--out",
            str(out),
            "--scheduler",
            "hybrid",
            "--cpu-workers",
            "2",
            "--io-threads",  # one download node at a time: the run lasts long enough for
            "1",  # the killed worker's replacement to register before it ends
            "--batch-size",
            str(BATCH),
            "--window",
            "4",
            "--dashboard-address",
            f"127.0.0.1:{dashboard}",
        ],
        cwd=tmp_path,
    )
    try:
        flow = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        while len(list((out / "manifest").glob("part-*.parquet"))) < 2:
            assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no manifest parts after 120 s"
            time.sleep(0.05)
        workers = cpu_worker_pids(flow, slow_server.port)
        while len(workers) != 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the I/O worker may be between two downloads: look again
            workers = cpu_worker_pids(flow, slow_server.port)
        assert len(workers) == 2, workers
        victim = busiest(workers)
        done_at_kill = len(list((out / "manifest").glob("part-*.parquet")))
        os.kill(victim, signal.SIGKILL)  # a CPU worker dies mid-run; its Nanny restarts it
        psutil.wait_procs([psutil.Process(victim)], timeout=10)
        # Its Nanny starts a replacement process, which listens once it is up.
        replaced: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            replaced = cpu_worker_pids(flow, slow_server.port)
            if len(replaced) == 2 and victim not in replaced:
                break
            time.sleep(0.2)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"
    assert proc.returncode == 0, stderr[-3000:]
    assert "FAILED" not in stdout
    assert done_at_kill < N_URLS // BATCH, "the kill did not land mid-run"
    assert victim not in replaced and len(replaced) == 2, replaced
    print(f"\nkilled {victim} after {done_at_kill}/{N_URLS // BATCH} batches; now {replaced}")

    df = pd.read_parquet(out / "manifest").sort_values("index")
    assert list(df["url"]) == urls
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"][["url", "status", "error"]]
    files = {p.relative_to(out).as_posix() for p in out.glob("*/*.jpg")}
    assert files == set(df["path"])
    assert list(out.rglob(".tmp-*")) == []
    for rel in df["path"]:
        with Image.open(out / rel) as im:
            im.load()
