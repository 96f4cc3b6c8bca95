"""imgtasks.preflight: the checks that make a setup problem one line that says what to do."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest
from conftest import free_port, subprocess_environment

from imgtasks import preflight
from imgtasks.preflight import BAD_SETTING, UNAVAILABLE, SetupError
from imgtasks.sinks import OutputSettings
from imgtasks.sources import SourceSettings

# --- preflight, in-process -----------------------------------------------------------------


def test_preflight_imports_no_dask() -> None:
    code = "import sys, imgtasks.preflight; print(sorted(m for m in sys.modules if 'dask' in m))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.strip() == "[]"


def test_output_root_is_created_and_the_probe_removed(tmp_path: Path) -> None:
    root = tmp_path / "new" / "out"
    preflight.check_output("--out", OutputSettings(str(root)))
    assert root.is_dir() and list(root.iterdir()) == []


def test_remote_output_probe_leaves_nothing() -> None:
    fs = fsspec.filesystem("memory")
    preflight.check_output("--out", OutputSettings("memory://preflight-test/out"))
    assert not fs.exists("/preflight-test/out") or fs.ls("/preflight-test/out") == []


def test_output_in_a_read_only_directory(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(SetupError) as err:
            preflight.check_output("--out", OutputSettings(str(tmp_path / "out")))
    finally:
        tmp_path.chmod(0o700)
    assert err.value.exit_code == BAD_SETTING and "Permission denied" in str(err.value)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), BAD_SETTING),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), BAD_SETTING),
        (OSError(errno.ENOSPC, "No space left on device"), UNAVAILABLE),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), UNAVAILABLE),
        (TimeoutError("read timed out"), UNAVAILABLE),
        (RuntimeError("Unable to locate credentials"), BAD_SETTING),
    ],
)
def test_unwritable_exit_codes(exc: Exception, code: int) -> None:
    error = preflight.unwritable("--out", "s3://b/x", exc)
    assert error.exit_code == code
    assert str(error).startswith("--out s3://b/x: cannot") and "\n" not in str(error)


def test_source_checks(tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1/a.jpg\n")
    preflight.check_source(SourceSettings(str(urls)))
    for bad, message in [
        (tmp_path, "is a directory"),
        (tmp_path / "missing.txt", "no such file"),
        ("memory://preflight-test/missing.txt", "no such file"),
    ]:
        with pytest.raises(SetupError, match=message) as err:
            preflight.check_source(SourceSettings(str(bad)))
        assert err.value.exit_code == BAD_SETTING


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("tcp://10.0.0.1:8786", ("10.0.0.1", 8786)),
        ("tls://sched.example:8786", ("sched.example", 8786)),
        ("tcp://[::1]:8786", ("::1", 8786)),
        ("inproc://10.0.0.1/1/2", None),
    ],
)
def test_tcp_host_port(address: str, expected: tuple[str, int] | None) -> None:
    assert preflight.tcp_host_port("--scheduler", address) == expected


@pytest.mark.parametrize("address", ["tcp://host", "tcp://host:port", "tcp://:8786"])
def test_scheduler_address_without_a_port(address: str) -> None:
    with pytest.raises(SetupError, match="tcp://host:8786") as err:
        preflight.tcp_host_port("--scheduler", address)
    assert err.value.exit_code == BAD_SETTING


def test_a_listening_scheduler_passes() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        preflight.check_scheduler(f"tcp://127.0.0.1:{port}", wait_s=5)


def test_a_silent_scheduler_fails_after_the_wait() -> None:
    with pytest.raises(SetupError, match="no scheduler answers") as err:
        preflight.check_scheduler(f"tcp://127.0.0.1:{free_port()}", wait_s=0.5)
    assert err.value.exit_code == UNAVAILABLE


def test_local_kinds_have_no_scheduler_to_check() -> None:
    for kind in ("hybrid", "processes", "threads", "sync"):
        preflight.check_scheduler(kind, wait_s=0)


def test_scheduler_file_that_never_appears(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="does not exist") as err:
        preflight.check_scheduler("hybrid", str(tmp_path / "s.json"), wait_s=0.3)
    assert err.value.exit_code == UNAVAILABLE


def test_scheduler_file_without_an_address(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"type": "Scheduler"}')
    with pytest.raises(SetupError, match="no scheduler address") as err:
        preflight.check_scheduler("hybrid", str(path), wait_s=0.3)
    assert err.value.exit_code == BAD_SETTING


def test_scheduler_file_written_while_we_wait(tmp_path: Path) -> None:
    path = tmp_path / "s.json"

    def write_later() -> None:
        time.sleep(0.5)
        path.write_text(json.dumps({"address": "tcp://127.0.0.1:8786"}))

    writer = threading.Thread(target=write_later)
    writer.start()
    try:
        assert preflight.address_in_file(str(path), time.monotonic() + 10) == (
            "tcp://127.0.0.1:8786"
        )
    finally:
        writer.join()


def test_explain_fsspec_errors() -> None:
    with pytest.raises(ValueError) as unknown:
        fsspec.get_filesystem_class("nosuch")
    error = preflight.explain(unknown.value)
    assert error is not None and error.exit_code == BAD_SETTING and "'nosuch'" in str(error)

    timed_out = OSError("Timed out trying to connect to tcp://10.0.0.1:8786 after 30 s")
    error = preflight.explain(timed_out)
    assert error is not None and error.exit_code == UNAVAILABLE

    assert preflight.explain(RuntimeError("a bug")) is None
    assert preflight.explain(ImportError("No module named 'foo'")) is None


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_explain_a_real_missing_backend() -> None:
    with pytest.raises(ImportError) as missing:
        fsspec.get_filesystem_class("gcs")
    error = preflight.explain(missing.value)
    assert error is not None and error.exit_code == BAD_SETTING
    assert "gcsfs" in str(error) and "pip install 'imgtasks[gcs]'" in str(error)
