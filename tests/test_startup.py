"""A run on a local cluster it starts itself: work goes out as soon as the scheduler is up,
while the workers join; runs that end first close cleanly; a worker that does not start
stops the run with one line; Ctrl-C meanwhile is a clean stop."""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import free_port, kill_tree, run_python, start_flow, subprocess_environment
from distributed import Client

import imgtasks
from imgtasks import api
from imgtasks import cluster as clusters
from imgtasks.cluster import ClusterSettings

SETTINGS = ClusterSettings(cpu_workers=2, io_threads=4, dashboard_address="127.0.0.1:0")
SLOW_START_S = 2.5  # how late the slowed workers join: far longer than the flow's own set-up


def preload_on(monkeypatch: pytest.MonkeyPatch, resource: str, code: str, tmp_path: Path) -> None:
    """The workers with ``resource`` (io, cpu) run ``code`` as they start (a preload)."""
    script = tmp_path / f"preload_{resource}.py"
    script.write_text(code)
    real = clusters.worker_options

    def options(*args: Any) -> dict[str, Any]:
        chosen = real(*args)
        if resource in chosen["resources"]:
            chosen["preload"] = [str(script)]
        return chosen

    monkeypatch.setattr(clusters, "worker_options", options)


def slow_start(monkeypatch: pytest.MonkeyPatch, resource: str, tmp_path: Path) -> None:
    preload_on(monkeypatch, resource, f"import time\ntime.sleep({SLOW_START_S})\n", tmp_path)


def workers_at_first_submission(monkeypatch: pytest.MonkeyPatch) -> list[set[str]]:
    """The names of the workers that had joined when the flow began to submit batches."""
    seen: list[set[str]] = []
    real = api.stream_batches

    def recording(client: Any, *args: Any) -> None:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        seen.append({str(w["name"]) for w in workers})
        real(client, *args)

    monkeypatch.setattr(api, "stream_batches", recording)
    return seen


@pytest.mark.timeout(120)
def test_batches_go_out_before_the_cpu_workers_join(
    tmp_path: Path, demo_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU workers that take seconds to start: the flow submits without them (on a
    cluster that waited for every worker, they would all be there), routes and sizes its
    window from the settings, and the thumbnail nodes wait for them in the scheduler."""
    slow_start(monkeypatch, "cpu", tmp_path)
    seen = workers_at_first_submission(monkeypatch)
    urls = demo_server.urls(12)
    result = imgtasks.thumbnails(
        urls, tmp_path / "out", cluster=SETTINGS, batch_size=4, progress=False
    )
    assert len(seen) == 1 and not seen[0] & {"cpu-0", "cpu-1"}, seen
    assert result.counts == {"ok": len(urls)}
    df = result.manifest()
    assert sorted(df["url"]) == sorted(urls) and (df["status"] == "ok").all()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["empty", "resumed"])
def test_tiny_runs_close_cleanly_while_the_workers_join(
    case: str, tmp_path: Path, demo_server, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """An empty list ends while the workers are still starting: closing waits for them and
    closes them, quietly. A list whose every URL an earlier run finished still sends its
    batches through the nodes, which wait for the workers."""
    urls = [] if case == "empty" else demo_server.urls(3)
    out = tmp_path / "out"
    if urls:
        imgtasks.thumbnails(urls, out, cluster="sync", progress=False)
    slow_start(monkeypatch, "io", tmp_path)
    slow_start(monkeypatch, "cpu", tmp_path)
    with caplog.at_level(logging.WARNING):
        result = imgtasks.thumbnails(
            urls, out, cluster=SETTINGS, resume=True, progress=False, job_page=False
        )
    assert result.entries == len(urls) and result.resumed == len(urls)
    assert not result.failed_batches
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("resource", ["cpu", "io"])
def test_a_worker_that_does_not_start_stops_the_run_with_one_line(
    resource: str, tmp_path: Path, demo_server, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    preload_on(monkeypatch, resource, "raise RuntimeError('no start (test)')\n", tmp_path)
    with (
        caplog.at_level(logging.ERROR, logger="imgtasks"),
        pytest.raises(imgtasks.SetupError, match="did not start") as failed,
    ):
        imgtasks.thumbnails(
            demo_server.urls(40), tmp_path / "out", cluster=SETTINGS, batch_size=4, progress=False
        )
    assert "no start (test)" in str(failed.value) and failed.value.exit_code == 1
    # the batches waiting for the worker are the run's, not failed ones: no row, no line
    assert not [r.getMessage() for r in caplog.records if r.name == "imgtasks.flow"]


@pytest.mark.timeout(180)
def test_ctrl_c_while_the_workers_join_is_a_clean_stop(tmp_path: Path) -> None:
    """SIGINT once the scheduler is up and the workers are still starting: exit 130 with
    the one line, no traceback, no worker process left."""
    slow = tmp_path / "slow_start.py"
    slow.write_text(f"import time\ntime.sleep({SLOW_START_S})\n")
    env = {"DASK_DISTRIBUTED__WORKER__PRELOAD": f'["{slow}"]'}
    proc = start_flow(
        [
            *("--out", str(tmp_path / "out"), "--count", "40", "--demo-port", "0"),
            *("--dashboard-address", f"127.0.0.1:{free_port()}", "--cpu-workers", "1"),
        ],
        env=subprocess_environment() | env,
    )
    children: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the scheduler is up, the workers start for seconds
            if line.startswith("dashboard:"):
                break
        children = spawned_workers(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        _gone, alive = psutil.wait_procs(children, timeout=20)
    finally:
        kill_tree(proc)
    assert proc.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], stderr[-3000:]
    assert children and not alive, f"worker processes left running: {alive}"


def spawned_workers(pid: int, timeout: float = 30) -> list[psutil.Process]:
    """The flow's processes once a worker is starting (they start for seconds): the
    multiprocessing resource tracker, the workers' fork server, and at least one worker
    forked from it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children(recursive=True)
        if len(children) >= 3:
            return children
        time.sleep(0.05)
    return []


@pytest.mark.parametrize("kind", ["hybrid", "processes", "threads"])
def test_slots_from_the_settings_are_what_the_workers_report(kind: str) -> None:
    """``spec_slots`` (what a joining cluster's window is sized by) counts the workers'
    own figures as ``worker_slots`` reads them from the scheduler."""
    settings = ClusterSettings(kind=kind, cpu_workers=3, io_threads=7)
    reported = [
        {"nthreads": s["options"]["nthreads"], "resources": s["options"]["resources"]}
        for s in clusters.worker_specs(settings).values()
    ]

    class Info:
        def scheduler_info(self, n_workers: int) -> dict:
            return {"workers": dict(enumerate(reported))}

    assert clusters.spec_slots(settings) == clusters.worker_slots(Info())  # type: ignore[arg-type]
    expected = {"hybrid": (3, 7), "processes": (3, 0), "threads": (6, 0)}[kind]
    assert clusters.spec_slots(settings) == expected
    assert clusters.Joining(settings, None).routes == (kind == "hybrid")  # type: ignore[arg-type]


def _imported_pandas() -> bool:
    return "pandas" in sys.modules


@pytest.mark.timeout(180)
def test_no_worker_imports_pandas(tmp_path: Path, demo_server) -> None:
    """pyarrow imports pandas at its first ``pa.array`` (0.5-0.6 s of CPU): the fork
    server does not preload it, and manifest parts, their compaction and shards (a failed
    row among them: nulls) are built without it."""
    urls = [*demo_server.urls(5), f"{demo_server.base_url}/status/404"]
    with imgtasks.local_cluster(SETTINGS) as cluster, Client(cluster) as client:
        for output_format in ("files", "webdataset", "parquet"):
            result = imgtasks.thumbnails(
                urls,
                tmp_path / output_format,
                client=client,
                output_format=output_format,
                progress=False,
                job_page=False,
            )
            assert result.counts == {"ok": 5, "http_4xx": 1}, output_format
            assert sorted(result.manifest()["url"]) == sorted(urls)
        imported = client.run(_imported_pandas)
    assert len(imported) == 3 and set(imported.values()) == {False}, imported


@pytest.mark.timeout(180)
def test_a_run_nobody_watches_imports_no_dashboard(tmp_path: Path, demo_server) -> None:
    """Dashboard and job page are served, but bokeh (~1 s of imports) comes only with the
    first request for one of their pages: a run nobody looks at never imports it."""
    code = f"""
import sys
import imgtasks
from imgtasks.cluster import ClusterSettings
settings = ClusterSettings(cpu_workers=1, io_threads=4, dashboard_address="127.0.0.1:0")
result = imgtasks.thumbnails({demo_server.urls(8)!r}, {str(tmp_path / "out")!r},
                             cluster=settings, progress=False)
print("COUNTS", result.counts, "JOB PAGE", bool(result.job_page))
print("BOKEH", sorted(m for m in sys.modules if m == "bokeh" or m.startswith("bokeh.")))
"""
    proc = run_python(code, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "COUNTS {'ok': 8} JOB PAGE True" in proc.stdout, proc.stdout
    assert "BOKEH []" in proc.stdout, proc.stdout
