"""Shared fixtures: every server a test needs is started here on 127.0.0.1, with time-outs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOWS = ROOT / "flows"
BENCHMARKS = ROOT / "benchmarks"
RUN = str(FLOWS / "run.py")
# A demo run slow enough (300 images at 200 ms through 2 download threads) to be looked at
# while it runs: its dashboard, its listening sockets.
SLOW_RUN = (
    *("--count", "300", "--latency", "0.2", "--cpu-workers", "1"),
    *("--io-threads", "2", "--batch-size", "4", "--window", "2"),
)
if str(BENCHMARKS) not in sys.path:  # benchmarks/ are scripts; their tests import them
    sys.path.insert(0, str(BENCHMARKS))
# Files the flow writes under --out besides thumbnails and the manifest.
RUN_FILES = frozenset({"run.log", "contact_sheet.jpg"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def demo_server() -> Iterator[object]:
    """A demo image server with no latency, shared by the session."""
    from imgtasks.demo import DemoServer, ServerSettings

    with DemoServer(ServerSettings(latency=0.0, jitter=0.0)) as server:
        yield server


def subprocess_environment() -> dict[str, str]:
    """Environment for subprocesses: the project importable, no proxies to escape loopback."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env.pop(var, None)
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -c CODE`` in a fresh interpreter with the project importable; output captured."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    return subprocess_environment()


def non_loopback_address() -> str | None:
    """This machine's own outward IPv4 address, or None; nothing is sent anywhere."""
    candidates = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it picks a route
        candidates.append(s.getsockname()[0])
    with contextlib.suppress(OSError):
        candidates.append(socket.gethostbyname(socket.gethostname()))
    return next((ip for ip in candidates if not ip.startswith("127.") and ip != "0.0.0.0"), None)


def thumbnail_files(out: Path) -> set[str]:
    """Every thumbnail under a local ``--out``, relative to it (not the manifest, run.log
    or the contact sheet)."""
    return {
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file()
        and p.relative_to(out).parts[0] != "manifest"
        and not p.name.startswith(".")
        and str(p.relative_to(out)) not in RUN_FILES
    }


def run_flow(
    args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 240
) -> subprocess.CompletedProcess:
    """``python flows/run.py --no-progress ARGS`` to completion, output captured."""
    return subprocess.run(
        [sys.executable, RUN, "--no-progress", *args],
        env=subprocess_environment() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess:
    """``runjob.main(["--no-progress", *ARGS])`` in this process, shaped like ``run_flow``'s
    result: what ``flows/run.py`` runs after its interpreter start, fork server and imports
    (~2 s per case). For argument and setup errors; a few tests keep the real command."""
    import logging

    if str(FLOWS) not in sys.path:
        sys.path.insert(0, str(FLOWS))
    import runjob

    said = logging.getLogger("imgtasks.run")  # main() gives it a handler to stdout
    kept = (list(said.handlers), said.level, said.propagate)
    capsys.readouterr()
    try:
        code = runjob.main(["--no-progress", *args])
    finally:
        said.handlers[:], said.level, said.propagate = kept
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["runjob.main", *args], code, out, err)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a run stopped by a setup check, after the common asserts."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("run.py: error: "), lines[0]
    assert "internal error" not in lines[0]
    # stopped before the source or the cluster started
    assert "demo server:" not in proc.stdout and "dashboard:" not in proc.stdout, proc.stdout
    return lines[0]


def client_refused(address: str, security: object = None) -> str | None:
    """Why ``Client(address)`` with these credentials failed, or None if it connected."""
    import gc

    from distributed import Client

    try:
        Client(address, timeout="5s", security=security).close()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        # A Client that failed to connect is closed by its __del__; collected at random
        # inside a later Client's thread start-up, that close deadlocked (a 110 s hang).
        gc.collect()


def tls_handshake_error(address: str) -> str | None:
    """Why a TLS handshake without a client certificate with ``tls://host:port`` failed, or
    None if it completed and the connection stayed open for a read."""
    import ssl

    host, port = address.removeprefix("tls://").rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we only want to see if the server lets us in
    try:
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.recv(1)  # TLS 1.3: the server checks the client's certificate after this
            return None
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


def start_flow(
    args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.Popen:
    """``python flows/run.py --no-progress ARGS`` in a session of its own, so a test can
    signal the flow alone or (``kill_tree``) its whole process tree."""
    return subprocess.Popen(
        [sys.executable, RUN, "--no-progress", *args],
        env=subprocess_environment() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        start_new_session=True,
    )


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a ``start_flow`` process group and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=30)


def wait_for_dashboard(proc: subprocess.Popen, port: int, timeout: float = 120) -> int | None:
    """The HTTP status of the flow's dashboard once it answers other than "starting" (503:
    the first request loads the dashboard, ~1-2 s); None if the flow ended or
    ``timeout`` passed first."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(requests.RequestException):  # not up yet, or busy
            status = requests.get(f"http://127.0.0.1:{port}/status", timeout=10).status_code
            if status != 503:
                return status
        time.sleep(0.5)
    return None
