"""File-format torture: every format Pillow writes, valid and mutilated, through one flow run.

``torture_files`` makes a few hundred small files (valid, truncated, lying about their size,
palette or lengths). The demo server serves them from a directory (``/files/``) and one
``flows/run.py`` run with the default settings fetches them all. What each must become is
worked out here from Pillow alone (see :func:`expected`), so the test checks the flow
against Pillow's own verdict, not against imgtasks' code.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import psutil
import pytest
from conftest import kill_tree, start_flow
from PIL import Image
from torture_files import TortureFile, torture_files

from imgtasks.demo import DemoServer, ServerSettings
from imgtasks.thumbnail import DEFAULT_THUMB, WEB_FORMATS

FLOW_TIMEOUT = 120  # seconds; the run itself takes ~15 s on 2 cores
# Statuses a file Pillow cannot fully decode may legitimately get.
BROKEN = {"decode_error", "truncated_image", "too_many_pixels", "unsupported_format"}
# What distributed logs when a worker process dies or is restarted (the pid count is
# the primary check; these say why, in the failure message).
RESTART_MESSAGES = ("Restarting worker", "was killed by signal", "KilledWorker", "exited with")


@dataclass(frozen=True)
class Expectation:
    status: str | None  # None: any status in BROKEN (Pillow itself could not decode it)
    source_format: str | None = None  # None: not checked
    why: str = ""


def expected(data: bytes) -> Expectation:
    """What the flow must record for ``data``, from Pillow alone (all its plugins).

    Identification ignores Pillow's bomb limit (a generous guard); the pixel limit is the
    flow's own ``max_pixels``; only files of an allowed format are fully decoded here.
    """
    try:
        with _no_bomb_limit(), Image.open(io.BytesIO(data)) as im:
            fmt, (width, height) = im.format or "", im.size
            if fmt not in WEB_FORMATS:
                return Expectation("unsupported_format", fmt, "Pillow identifies a refused format")
            if width * height > DEFAULT_THUMB.max_pixels:
                return Expectation("too_many_pixels", fmt, "over max_pixels")
            if width < 1 or height < 1:
                return Expectation(None, why="empty image")
            im.load()
    except Exception as exc:
        return Expectation(None, why=f"Pillow fails: {type(exc).__name__}: {exc}")
    return Expectation("ok", fmt, "Pillow decodes it")


@contextlib.contextmanager
def _no_bomb_limit() -> Iterator[None]:
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


class WorkerWatch:
    """Every worker process seen under the flow while it runs, polled with psutil.

    Dask's Nanny (inside the flow's process) has each worker forked by multiprocessing's
    fork server, a child of the flow (imgtasks/workerstart.py); a worker that dies is
    replaced by a new process, so more distinct worker pids than workers means a restart.
    Only the fork server's own children count: a process a worker starts carries the
    worker's command line between fork and exec.
    ``workers`` maps each pid to when it was first seen, for the report.
    """

    def __init__(self, flow: subprocess.Popen) -> None:
        self.flow = psutil.Process(flow.pid)
        self.workers: dict[int, str] = {}
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> WorkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _poll(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                for server in filter(_is_fork_server, self.flow.children()):
                    for child in server.children():
                        if child.pid not in self.workers:
                            seen = time.monotonic() - self._start
                            self.workers[child.pid] = f"seen at {seen:.1f} s"
            time.sleep(0.05)


def _is_fork_server(proc: psutil.Process) -> bool:
    try:
        return "multiprocessing.forkserver" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def dask_lines(stderr: str) -> list[str]:
    """What distributed itself logged (warnings and errors reach stderr)."""
    return [ln for ln in stderr.splitlines() if "distributed." in ln or "Worker" in ln]


@dataclass(frozen=True)
class TortureRun:
    files: dict[str, TortureFile]  # by URL
    rows: pd.DataFrame
    returncode: int
    stdout: str
    stderr: str
    workers: dict[int, str]  # worker pid -> when it was first seen
    seconds: float


@pytest.fixture(scope="module")
def torture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TortureRun]:
    root = tmp_path_factory.mktemp("torture")
    served = root / "files"
    served.mkdir()
    files, _ = torture_files()
    for f in files:
        (served / f.name).write_bytes(f.data)
    settings = ServerSettings(latency=0.0, jitter=0.0, files_dir=str(served))
    with DemoServer(settings) as server:
        by_url = {server.file_url(f.name): f for f in files}
        listing = root / "urls.txt"
        listing.write_text("".join(f"{url}\n" for url in by_url))
        out = root / "out"
        args = ["--urls", str(listing), "--out", str(out), "--cpu-workers", "1"]
        start = time.monotonic()
        proc = start_flow([*args, "--io-threads", "8", "--dashboard-address", "127.0.0.1:0"])
        try:
            with WorkerWatch(proc) as watch:
                stdout, stderr = proc.communicate(timeout=FLOW_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            pytest.fail(f"the flow did not finish in {FLOW_TIMEOUT} s")
        seconds = time.monotonic() - start
    rows = pd.read_parquet(out / "manifest") if (out / "manifest").exists() else pd.DataFrame()
    yield TortureRun(by_url, rows, proc.returncode, stdout, stderr, dict(watch.workers), seconds)


def test_generator_covers_every_writable_format() -> None:
    files, unwritable = torture_files()
    Image.init()
    written = {f.written_as for f in files}
    assert written | {u.format for u in unwritable} == set(Image.SAVE)
    # Only stub plugins (a handler must be installed by the application) write nothing.
    assert all("save handler not installed" in u.reason for u in unwritable), unwritable
    assert {"BMP", "PNG", "GIF", "JPEG", "TGA", "PCX", "SGI", "ICO", "TIFF", "WEBP"} <= written
    assert 100 <= len(files) <= 500 and sum(len(f.data) for f in files) < 5_000_000


def test_flow_finishes_cleanly(torture: TortureRun) -> None:
    assert torture.returncode == 0, torture.stderr[-3000:]
    assert "Traceback" not in torture.stderr, torture.stderr[-3000:]


def test_one_row_per_url(torture: TortureRun) -> None:
    assert not torture.rows.empty, torture.stderr[-3000:]
    counts = torture.rows["url"].value_counts()
    assert set(counts.index) == set(torture.files)
    assert (counts == 1).all(), counts[counts > 1]


def test_no_worker_was_restarted(torture: TortureRun) -> None:
    # One I/O worker and one CPU worker: exactly two worker processes for the whole run.
    report = {"workers": torture.workers, "dask": dask_lines(torture.stderr)}
    assert len(torture.workers) == 2, report
    assert not [m for m in RESTART_MESSAGES if m in torture.stderr], report


def test_every_file_gets_pillows_verdict(torture: TortureRun) -> None:
    rows = torture.rows.set_index("url")
    wrong = []
    for url, f in torture.files.items():
        row, want = rows.loc[url], expected(f.data)
        got = (row["status"], row["source_format"])
        if want.status is None:
            ok = row["status"] in BROKEN
        else:
            ok = row["status"] == want.status and row["source_format"] == want.source_format
        if not ok:
            wrong.append(f"{f.name}: got {got}, {row['error']!r}; want {want}")
    assert not wrong, "\n".join(wrong)


def test_every_status_is_exercised(torture: TortureRun) -> None:
    statuses = set(torture.rows["status"])
    assert {"ok", "unsupported_format", "decode_error", "truncated_image"} <= statuses
    assert "too_many_pixels" in statuses
    assert statuses <= BROKEN | {"ok"}, statuses


def test_run_is_quick(torture: TortureRun) -> None:
    assert torture.seconds < 60, torture.seconds
