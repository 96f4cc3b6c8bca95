"""A problem with a setting or the environment is one line on stderr that says what to do,
found before anything starts; tracebacks only at --log-level DEBUG.

The CLI cases run the command line's ``main()`` in-process (``run_main``: what
flows/run.py runs after its interpreter start and imports, ~2 s a case saved); those that
need their own environment or the real entry point (a missing package, the scheduler
waits, the DEBUG traceback) run flows/run.py as a user would (a subprocess). "Before
anything starts" is checked by what the flow did not print (no demo server, no
dashboard), not by the clock.
The unit tests below them call ``imgtasks.preflight`` in-process.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import socket
import threading
import time
from pathlib import Path

import fsspec
import pytest
from certs import DAY, Pem, make_ca, make_cert
from conftest import (
    free_port,
    one_line_error,
    run_flow,
    run_main,
    run_python,
    subprocess_environment,
)

from imgtasks import preflight
from imgtasks.preflight import BAD_SETTING, UNAVAILABLE, SetupError
from imgtasks.sinks import OutputSettings
from imgtasks.sources import SourceSettings

CLI_TIMEOUT = 90  # generous: the checks take seconds
WAIT = ("--scheduler-wait", "1")  # for a scheduler that is not there (default 10 s)


def hidden_package_env(tmp_path: Path, package: str) -> dict[str, str]:
    """An environment where ``import package`` fails as it does when it is not installed:
    a package of that name, first on PYTHONPATH, that raises ModuleNotFoundError."""
    shadow = tmp_path / "hidden" / package
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{package}'\", name={package!r})\n"
    )
    env = subprocess_environment()
    env["PYTHONPATH"] = os.pathsep.join([str(shadow.parent), env["PYTHONPATH"]])
    return env


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a directory\n")
    return path


# --- the CLI -------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("option", ["--out", "--keep-originals"])
def test_output_that_cannot_be_created(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    proc = run_main([option, "/proc/nope"], capsys)
    line = one_line_error(proc)
    assert proc.returncode == BAD_SETTING
    assert f"{option} /proc/nope" in line and "you can write to" in line


def test_output_that_is_a_file(a_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = run_main(["--out", str(a_file)], capsys)
    line = one_line_error(proc)
    assert proc.returncode == BAD_SETTING
    assert "existing file" in line and "give a directory" in line
    assert a_file.read_text() == "not a directory\n"


def test_unknown_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    proc = run_main(["--out", "nosuch://x"], capsys)
    line = one_line_error(proc)
    assert proc.returncode == BAD_SETTING
    assert "'nosuch'" in line and "s3://" in line


def test_urls_that_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = run_main(["--urls", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    line = one_line_error(proc)
    assert proc.returncode == BAD_SETTING
    assert "is a directory" in line and ".txt" in line


def test_s3_without_s3fs(tmp_path: Path) -> None:
    # s3fs is installed here (the S3 tests use it); hide it the way a missing one fails
    env = hidden_package_env(tmp_path, "s3fs")
    proc = run_flow(["--out", "s3://bucket/x"], env=env, timeout=CLI_TIMEOUT)
    line = one_line_error(proc)
    assert proc.returncode == BAD_SETTING
    assert "s3fs" in line and "pip install 'imgtasks[s3]'" in line


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_gcs_without_gcsfs() -> None:
    proc = run_flow(["--out", "gs://bucket/x"], timeout=CLI_TIMEOUT)
    line = one_line_error(proc)
    assert proc.returncode == BAD_SETTING
    assert "gcsfs" in line and "pip install 'imgtasks[gcs]'" in line


def test_scheduler_wait_reaches_the_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--scheduler-wait is the wait the scheduler check is given (the default 10 s when
    not set); the check itself, with a wait, is tested in-process below."""
    waits: list[float] = []

    def refusing(kind: str, scheduler_file: str | None, wait_s: float, tls: object) -> None:
        waits.append(wait_s)
        raise SetupError("no scheduler (test)", UNAVAILABLE)

    monkeypatch.setattr(preflight, "check_scheduler", refusing)
    address = ("--scheduler", f"tcp://127.0.0.1:{free_port()}", "--out", str(tmp_path))
    for flags in ([], ["--scheduler-wait", "2.5"], ["--scheduler-wait", "0"]):
        proc = run_main([*address, *flags], capsys)
        assert proc.returncode == UNAVAILABLE and "no scheduler (test)" in proc.stderr
    assert waits == [preflight.SCHEDULER_WAIT_S, 2.5, 0.0]


def test_unreachable_scheduler() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_flow(["--scheduler", address, *WAIT], timeout=CLI_TIMEOUT)
    line = one_line_error(proc)
    assert proc.returncode == UNAVAILABLE
    assert address in line and "no scheduler answers" in line and "dask scheduler" in line


def test_scheduler_file_naming_a_dead_scheduler(tmp_path: Path) -> None:
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({"address": f"tcp://127.0.0.1:{free_port()}"}))
    proc = run_flow(["--scheduler-file", str(scheduler_file), *WAIT], timeout=CLI_TIMEOUT)
    line = one_line_error(proc)
    assert proc.returncode == UNAVAILABLE
    assert str(scheduler_file) in line and "no scheduler answers" in line


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pem]:
    """A CA, a client certificate it signs, an expired one, and a stray CA's certificate."""
    certs = tmp_path_factory.mktemp("certs")
    ca = make_ca(certs)
    return {
        "ca": ca,
        "client": make_cert(certs, "client", ca),
        "expired": make_cert(certs, "expired", ca, valid_from=-10 * DAY, valid_to=-DAY),
        "stray": make_ca(certs, "stray-ca"),
    }


def tls_case(name: str, files: dict[str, Pem], tmp_path: Path) -> list[str]:
    """--tls-* flags with one thing wrong, named by ``name``."""
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    ca, cert, key = (str(p) for p in (files["ca"].cert, files["client"].cert, files["client"].key))
    expired = files["expired"]
    ca, cert, key = {
        "missing CA file": (str(tmp_path / "nope.pem"), cert, key),
        "CA file not PEM": (str(not_pem), cert, key),
        "certificate not PEM": (ca, str(not_pem), key),
        "another certificate's key": (ca, cert, str(files["stray"].key)),
        "expired certificate": (ca, str(expired.cert), str(expired.key)),
    }[name]
    return ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("missing CA file", "nope.pem: no such file"),
        ("CA file not PEM", "holds no PEM certificate"),
        ("certificate not PEM", "not a PEM certificate and its private key"),
        ("another certificate's key", "is not the key of --tls-cert"),
        ("expired certificate", "expired on "),
    ],
)
def test_bad_tls_files(
    case: str,
    said: str,
    tls_files: dict[str, Pem],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # nothing listens at the address: the files are checked first, in milliseconds
    address = f"tls://127.0.0.1:{free_port()}"
    proc = run_main(["--scheduler", address, *tls_case(case, tls_files, tmp_path)], capsys)
    line = one_line_error(proc)
    assert proc.returncode == BAD_SETTING
    assert said in line, line


def test_tls_files_with_a_tcp_address(
    tls_files: dict[str, Pem], capsys: pytest.CaptureFixture[str]
) -> None:
    flags = tls_files["client"].flags(tls_files["ca"])
    proc = run_main(["--scheduler", f"tcp://127.0.0.1:{free_port()}", *flags], capsys)
    line = one_line_error(proc)
    assert proc.returncode == BAD_SETTING
    assert "is not a tls:// address" in line


def test_tls_files_for_a_local_cluster(
    tls_files: dict[str, Pem], capsys: pytest.CaptureFixture[str]
) -> None:
    proc = run_main(["--tls-cert", str(tls_files["client"].cert)], capsys)
    line = one_line_error(proc)
    assert proc.returncode == BAD_SETTING
    assert "local clusters make their own certificates" in line


def test_debug_log_level_adds_the_traceback(a_file: Path) -> None:
    proc = run_flow(["--out", str(a_file), "--log-level", "DEBUG"], timeout=CLI_TIMEOUT)
    assert proc.returncode == BAD_SETTING
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("run.py: error: ")


# --- the one line a failure becomes (flows/run.py prints it after "run.py: ") --------------


def test_a_bug_is_an_internal_error_line() -> None:
    assert preflight.failure_line(RuntimeError("boom")) == (
        "internal error: boom (--log-level DEBUG shows where)",
        1,
    )


def test_a_setup_error_is_its_own_line() -> None:
    line, code = preflight.failure_line(preflight.SetupError("fix it", 2))
    assert (line, code) == ("error: fix it", 2)


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_missing_backend_met_during_the_run_is_one_line() -> None:
    with pytest.raises(ImportError) as missing:  # as when fsspec first meets gs:// mid-run
        fsspec.get_filesystem_class("gcs")
    line, code = preflight.failure_line(missing.value)
    assert code == BAD_SETTING
    assert line.startswith("error: Please install gcsfs")
    assert line.endswith("pip install 'imgtasks[gcs]'")


# --- preflight, in-process -----------------------------------------------------------------


def test_preflight_imports_no_dask() -> None:
    code = "import sys, imgtasks.preflight; print(sorted(m for m in sys.modules if 'dask' in m))"
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


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


def test_good_tls_files_pass(tls_files: dict[str, Pem]) -> None:
    ca, client = tls_files["ca"], tls_files["client"]
    files = {
        "tls_ca_file": ("--tls-ca-file", str(ca.cert)),
        "tls_cert": ("--tls-cert", str(client.cert)),
        "tls_key": ("--tls-key", str(client.key)),
    }
    preflight.check_tls("--scheduler tls://h:1", "tls://h:1", files)
    preflight.check_tls("--scheduler tcp://h:1", "tcp://h:1", {})
    with pytest.raises(SetupError, match="speaks TLS: give --tls-ca-file"):
        preflight.check_tls("--scheduler tls://h:1", "tls://h:1", {})
    config_files = {"tls_ca_file": ("distributed.comm.tls.ca-file", "/nowhere.pem")}
    preflight.check_tls("--scheduler tcp://h:1", "tcp://h:1", config_files)  # not for us


@pytest.mark.parametrize(
    ("message", "said"),
    [
        ("TLS certificate does not match. Check your security settings.", None),
        ("in <TLS (closed)>: SSLError: [SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert", "trust"),
        ("in <TCP (closed)>: ConnectionResetError: [Errno 104] Connection reset by peer", "tls://"),
        ("IOStream is not idle; cannot convert to SSL", "does not speak TLS"),
        ("a bug", None),
    ],
)
def test_tls_refusals(message: str, said: str | None) -> None:
    error = preflight.tls_refusal(RuntimeError(message), "--scheduler tls://h:1")
    if said is None:
        assert error is None or "not signed by the CA" in str(error)
    else:
        assert error is not None and said in str(error) and error.exit_code == BAD_SETTING
        assert str(error).startswith("--scheduler tls://h:1: ")


def test_a_certificate_error_is_found_in_the_cause() -> None:
    try:
        try:
            raise OSError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
        except OSError as cause:
            raise RuntimeError("TLS certificate does not match") from cause
    except RuntimeError as exc:
        error = preflight.tls_refusal(exc, "--scheduler tls://h:1")
    assert error is not None and "not signed by the CA given" in str(error)


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_explain_a_real_missing_backend() -> None:
    with pytest.raises(ImportError) as missing:
        fsspec.get_filesystem_class("gcs")
    error = preflight.explain(missing.value)
    assert error is not None and error.exit_code == BAD_SETTING
    assert "gcsfs" in str(error) and "pip install 'imgtasks[gcs]'" in str(error)
