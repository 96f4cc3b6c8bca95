"""Interrupted runs: SIGKILL then ``--resume`` URL by URL, and a clean Ctrl-C (exit 130)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import conftest
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import free_port, kill_tree
from PIL import Image

from imgtasks.demo import DemoServer, ServerSettings

N_URLS = 160
FLOW_ARGS = [
    "--scheduler",
    "hybrid",
    "--cpu-workers",
    "1",
    "--io-threads",
    "4",
    "--batch-size",
    "4",
    "--window",
    "4",
    "--timeout",
    "10",
]


@pytest.fixture(scope="module")
def slow_server() -> Iterator[DemoServer]:
    """Latency so a run lasts long enough for a kill to land mid-run."""
    with DemoServer(ServerSettings(latency=0.1, jitter=0.0)) as server:
        yield server


def start_flow(listing: Path, out: Path, *extra: str) -> subprocess.Popen:
    return conftest.start_flow(
        [
            *("--urls", str(listing), "--out", str(out)),
            *("--dashboard-address", f"127.0.0.1:{free_port()}", *FLOW_ARGS, *extra),
        ],
        cwd=listing.parent,
    )


def parts(out: Path) -> list[Path]:
    return sorted((out / "manifest").glob("part-*.parquet"))


def wait_for_parts(proc: subprocess.Popen, out: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(parts(out)) < n:
        assert proc.poll() is None, f"the run ended before {n} parts: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"fewer than {n} manifest parts after {timeout} s"
        time.sleep(0.05)


def temp_files(out: Path) -> list[Path]:
    return list(out.rglob(".tmp-*"))


def assert_thumbnails_decode(out: Path, df: pd.DataFrame) -> None:
    for rel in df.loc[df["status"] == "ok", "path"]:
        with Image.open(out / rel) as im:
            im.load()
            assert max(im.size) <= 128


def request_path(url: str) -> str:
    parts_ = urlsplit(url)
    return parts_.path + (f"?{parts_.query}" if parts_.query else "")


@pytest.mark.timeout(300)
def test_sigkill_then_resume_fetches_only_what_is_left(
    tmp_path: Path, slow_server: DemoServer
) -> None:
    urls = slow_server.urls(N_URLS)
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    out = tmp_path / "out"

    slow_server.reset_counts()
    first = start_flow(listing, out)
    try:
        wait_for_parts(first, out, 2)
        os.killpg(first.pid, signal.SIGKILL)  # the whole run dies at once, mid-write or not
        first.communicate(timeout=30)
    finally:
        kill_tree(first)
    assert first.returncode == -signal.SIGKILL
    litter = set(temp_files(out))  # a write cut by SIGKILL can leave only a .tmp-* name
    # pyarrow ignores dot-files: the parts that exist are exactly what a reader sees.
    before = pd.read_parquet(out / "manifest")
    done = set(before.loc[before["status"] == "ok", "url"])
    assert 0 < len(done) < N_URLS, "the kill did not land mid-run"

    # A temporary from a run killed long ago: --resume sweeps it (fresh ones may be live).
    planted = out / "ab" / "cd" / ".tmp-killed-long-ago"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"partial")
    os.utime(planted, (time.time() - 3600, time.time() - 3600))

    slow_server.reset_counts()
    second = start_flow(listing, out, "--resume")
    try:
        stdout, stderr = second.communicate(timeout=240)
    finally:
        kill_tree(second)
    assert second.returncode == 0, stderr[-3000:]
    assert f"resume: {len(done)} URLs already done" in stdout
    assert "stale temporary files removed" in stdout and not planted.exists()
    assert f"({len(done)} ok rows resumed" in stdout

    df = pd.read_parquet(out / "manifest")
    assert len(df) == df["url"].nunique() == N_URLS
    assert sorted(df["index"]) == list(range(N_URLS))
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"][["url", "status", "error"]]
    assert set(df["url"]) == set(urls)
    assert set(temp_files(out)) <= litter, "the resumed run left partial files"
    assert_thumbnails_decode(out, df)

    counts = slow_server.request_counts()
    again = {u: counts[request_path(u)] for u in done if request_path(u) in counts}
    assert again == {}, "URLs finished in the first run were fetched again"
    rest = [u for u in urls if u not in done]
    assert all(counts.get(request_path(u), 0) >= 1 for u in rest)
    # Kept for the report: first-run ok count, requests to those again, requests to the rest.
    print(
        f"\nfirst run ok={len(done)} rows_after_kill={len(before)}; second run: "
        f"requests to those={sum(again.values())}, to the other {len(rest)} URLs="
        f"{sum(counts.get(request_path(u), 0) for u in rest)}; litter={len(litter)}"
    )


@pytest.mark.timeout(300)
def test_ctrl_c_exits_130_and_keeps_finished_batches(
    tmp_path: Path, slow_server: DemoServer
) -> None:
    urls = slow_server.urls(120)
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    out = tmp_path / "out"
    proc = start_flow(listing, out)
    children: list[psutil.Process] = []
    try:
        wait_for_parts(proc, out, 2)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)  # the flow process alone, as a Ctrl-C it handles
        stdout, stderr = proc.communicate(timeout=60)
        _gone, alive = psutil.wait_procs(children, timeout=20)
    finally:
        kill_tree(proc)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "status" in stdout and "total" in stdout and "wall time" in stdout
    assert children and not alive, f"worker processes left running: {alive}"

    kept = parts(out)
    assert len(kept) >= 2
    rows = 0
    for part in kept:
        table = pq.read_table(part)  # every kept part is a whole, readable Parquet file
        rows += table.num_rows
    df = pd.read_parquet(out / "manifest")
    assert len(df) == rows < len(urls)
    assert df["url"].is_unique and set(df["url"]) <= set(urls)
    assert temp_files(out) == []
    assert_thumbnails_decode(out, df)
    assert "run stopped: KeyboardInterrupt" in (out / "run.log").read_text()
