"""Checks run before a job starts anything, so that a problem with a setting or with the
environment is one line saying what to do, found in seconds instead of after a cluster
start-up, a 30 s connect time-out and a traceback.

No dask here: the checks are plain sockets, files and fsspec, and run before the cluster.

A ``SetupError`` carries the process exit code:

- 2, ``BAD_SETTING``: fix the option, or install what the message names, then rerun;
- 1, ``UNAVAILABLE``: something outside is not there (the scheduler, the storage); the
  same command can work once it is.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import fsspec
from fsspec.registry import known_implementations

from imgtasks.partitions import is_glob
from imgtasks.sinks import TEMP_PREFIX, OutputSettings, filesystem, is_local, write_atomic
from imgtasks.sources import SourceSettings

if TYPE_CHECKING:  # imgtasks.cluster imports dask
    from imgtasks.cluster import ClusterSettings

log = logging.getLogger(__name__)

BAD_SETTING = 2
UNAVAILABLE = 1
# How long a scheduler (or its scheduler file) may take to appear. Dask's Client waits 30 s
# for both, which tolerates a scheduler started alongside the client; 10 s keeps that and
# makes a wrong address cost seconds.
SCHEDULER_WAIT_S = 10.0
RETRY_S = 0.2
PROBED_SCHEMES = ("tcp", "tls", "ws", "wss")  # all listen on a TCP host:port
# fsspec protocol -> the extra of pyproject.toml that installs its filesystem
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "abfs": "azure", "az": "azure"}
UNKNOWN_PROTOCOL = "Protocol not known: "  # fsspec's ValueError for an unregistered protocol
CONNECT_TIMED_OUT = "Timed out trying to connect to "  # distributed's OSError
# Reasons to rerun later rather than change the command.
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})
LIST_FORMATS = ".txt/.csv/.tsv/.parquet/.jsonl, optionally .gz"
TLS_FLAGS = "--tls-ca-file, --tls-cert and --tls-key"
# What distributed raises when a client's TLS settings do not fit the scheduler's, and what
# to do. Measured with distributed 2026.7: each comes within 10 ms of the connect, unretried.
TLS_REFUSALS = (
    ("certificate has expired", "the scheduler's certificate has expired: make new ones"),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the scheduler's certificate is not signed by the CA given (--tls-ca-file): give the "
        "cluster's CA",
    ),
    (
        "ALERT_UNKNOWN_CA",
        "the scheduler does not trust this client's certificate (--tls-cert): give one "
        "signed by the cluster's CA",
    ),
    ("ALERT_CERTIFICATE", "the scheduler refused this client's certificate (--tls-cert)"),
    (  # TLS 1.3: the scheduler checks the client's certificate after the client's handshake
        "EOF occurred in violation of protocol",
        "the scheduler dropped the TLS connection: most likely it does not trust this "
        "client's certificate (--tls-cert); give one signed by the cluster's CA",
    ),
    (
        "IOStream is not idle; cannot convert to SSL",
        "the scheduler does not speak TLS: give its tcp:// address",
    ),
    (
        "Connection reset by peer",
        f"the scheduler closed the connection: if it speaks TLS, give its tls:// address and "
        f"{TLS_FLAGS}",
    ),
    (
        "Timed out during handshake",
        f"the scheduler did not complete Dask's handshake: if it speaks TLS, give its tls:// "
        f"address and {TLS_FLAGS}",
    ),
    (
        "encryption required by Dask configuration",
        "TLS is required (a certificate, or distributed.comm.require-encryption) but the "
        "address is not tls://",
    ),
    ("TLS expects a `ssl_context`", f"a tls:// scheduler needs {TLS_FLAGS}"),
)

T = TypeVar("T")


class SetupError(Exception):
    """A setting or the environment stops the run before it starts; ``str()`` is one line
    that says what to do."""

    def __init__(self, message: str, exit_code: int = BAD_SETTING) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def check(
    output: OutputSettings,
    *,
    originals: OutputSettings | None = None,
    source: SourceSettings | None = None,
    cluster: ClusterSettings | None = None,
) -> None:
    """Raise ``SetupError`` for the first problem found; the scheduler, slowest, last."""
    check_output("--out", output)
    if originals is not None:
        check_output("--keep-originals", originals)
    if source is not None:
        check_source(source)
    if cluster is not None:
        check_scheduler(
            cluster.kind, cluster.scheduler_file, cluster.scheduler_wait, cluster.tls_files()
        )


# --- filesystems ---------------------------------------------------------------------------


def explain(exc: BaseException) -> SetupError | None:
    """The ``SetupError`` for an exception that means a setup problem, not a bug: fsspec's
    missing backend or unknown protocol, distributed's scheduler that never answered."""
    if isinstance(exc, SetupError):
        return exc
    if isinstance(exc, ImportError):
        return missing_backend(exc)
    if isinstance(exc, ValueError) and str(exc).startswith(UNKNOWN_PROTOCOL):
        protocol = str(exc).removeprefix(UNKNOWN_PROTOCOL).strip()
        return SetupError(
            f"unknown filesystem protocol {protocol!r}: give a local path or a URL of a "
            "filesystem fsspec knows, such as s3://bucket/path, gs://... or az://..."
        )
    if isinstance(exc, OSError) and str(exc).startswith(CONNECT_TIMED_OUT):
        return SetupError(f"{exc}: is a Dask scheduler running there?", UNAVAILABLE)
    return None


def failure_line(exc: BaseException) -> tuple[str, int]:
    """The one line a failed run ends with, and its exit code: a setup problem says what to
    do (2: a setting to fix, 1: something unavailable); anything else is a bug."""
    setup = explain(exc)
    if setup is not None:
        return f"error: {setup}", setup.exit_code
    return f"internal error: {exc} (--log-level DEBUG shows where)", UNAVAILABLE


def missing_backend(exc: ImportError) -> SetupError | None:
    """fsspec raises ``ImportError(<its hint>)`` when a protocol's package will not import."""
    protocols = [p for p, spec in known_implementations.items() if spec.get("err") == str(exc)]
    if not protocols:
        return None
    package = known_implementations[protocols[0]]["class"].split(".")[0]
    if package == "fsspec":  # fsspec's own filesystem; its hint names the missing package
        return SetupError(str(exc))
    extra = next((EXTRAS[p] for p in protocols if p in EXTRAS), None)
    todo = f"pip install 'imgtasks[{extra}]'" if extra else f"pip install {package}"
    cause = f" ({exc.__cause__})" if exc.__cause__ else ""  # installed but broken, or absent
    return SetupError(f"{exc}{cause}: {todo}")


def resolved(label: str, location: str, resolve: Callable[[], T]) -> T:
    """``resolve()``, with fsspec's missing-backend and unknown-protocol errors as one line."""
    try:
        return resolve()
    except (ImportError, ValueError) as exc:
        known = explain(exc)
        if known is None:
            raise
        raise SetupError(f"{label} {location}: {known}", known.exit_code) from exc


def check_output(label: str, settings: OutputSettings) -> None:
    """The output root exists (created if missing) and takes a file: a probe is written
    atomically and deleted, the way every thumbnail and manifest part is written."""
    fs, root = resolved(label, settings.root, lambda: filesystem(settings))
    if is_local(fs) and os.path.exists(root) and not os.path.isdir(root):
        raise SetupError(
            f"{label} {settings.root} is an existing file: give a directory "
            "(it is created if missing)"
        )
    probe = f"{root}/{TEMP_PREFIX}preflight-{uuid.uuid4().hex}"  # swept if we are killed
    try:
        write_atomic(fs, probe, b"")
        fs.rm_file(probe)
    except Exception as exc:  # remote filesystems raise their own types, not only OSError
        raise unwritable(label, settings.root, exc) from exc


def unwritable(label: str, location: str, exc: Exception) -> SetupError:
    reason = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (ConnectionError, TimeoutError)) or (
        isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS
    ):
        return SetupError(
            f"{label} {location}: cannot write there ({reason}); check that the storage is "
            "reachable and has space, then rerun",
            UNAVAILABLE,
        )
    return SetupError(
        f"{label} {location}: cannot create or write there ({reason}); give a {label} you can "
        "write to"
    )


def check_source(settings: SourceSettings) -> None:
    """The URL list is a file this process can open (remote lists: if the store says so)."""
    label, location = "--urls", settings.path
    fs, path = resolved(
        label, location, lambda: fsspec.core.url_to_fs(location, **settings.storage_options)
    )
    if is_glob(location):  # several lists, read by the workers
        if not fs.glob(path):
            raise SetupError(f"{label}: no file matches {location}")
        return
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise SetupError(f"{label}: no such file: {location}") from None
    except Exception as exc:  # a remote store that will not say; reading it will tell
        log.debug("--urls %s not checked: %s", location, exc)
        return
    if info.get("type") == "directory":
        raise SetupError(f"{label} {location} is a directory: give the URL list ({LIST_FORMATS})")
    if is_local(fs) and not os.access(path, os.R_OK):
        raise SetupError(f"{label} {location}: permission denied; give a file you can read")


# --- the scheduler -------------------------------------------------------------------------


def check_scheduler(
    kind: str,
    scheduler_file: str | None = None,
    wait_s: float = SCHEDULER_WAIT_S,
    tls: Mapping[str, tuple[str, str]] | None = None,
) -> None:
    """A remote scheduler (an address, or one named by a scheduler file) accepts a TCP
    connection within ``wait_s``, and the client's TLS files (``tls``, as
    ``ClusterSettings.tls_files()`` gives them) fit its address; local kinds have nothing
    to check."""
    deadline = time.monotonic() + wait_s
    if scheduler_file is not None:
        address = address_in_file(scheduler_file, deadline)
        label = f"--scheduler-file {scheduler_file} ({address})"
    elif "://" in kind:
        label, address = f"--scheduler {kind}", kind
    else:
        return
    if tls is not None:
        check_tls(label, address, tls)
    host_port = tcp_host_port(label, address)
    if host_port is not None:
        wait_for_listener(label, host_port, deadline)


def address_in_file(path: str, deadline: float) -> str:
    """The ``address`` of a Dask scheduler file, waiting until ``deadline`` for the file to
    appear and be complete (a scheduler just started writes it)."""
    while True:
        try:
            return str(_read_json(path)["address"])
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise SetupError(
                    f"--scheduler-file {path} does not exist: start the scheduler with "
                    f"`dask scheduler --scheduler-file {path}` or fix the path",
                    UNAVAILABLE,
                ) from None
        except (ValueError, KeyError, TypeError) as exc:  # or not yet completely written
            if time.monotonic() >= deadline:
                raise SetupError(
                    f"--scheduler-file {path} holds no scheduler address: is it the file "
                    "`dask scheduler --scheduler-file` wrote?"
                ) from exc
        except OSError as exc:
            raise SetupError(f"--scheduler-file {path}: cannot read it ({exc.strerror})") from exc
        time.sleep(RETRY_S)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def tcp_host_port(label: str, address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a TCP-based scheduler address; None for one we cannot probe."""
    parts = urlsplit(address)
    if parts.scheme not in PROBED_SCHEMES:
        return None
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise SetupError(f"{label}: give a scheduler address like tcp://host:8786")
    return parts.hostname, port


def wait_for_listener(label: str, host_port: tuple[str, int], deadline: float) -> None:
    """Connect (and close) until something accepts, or raise at ``deadline``."""
    while True:
        reason = connect_error(label, host_port, timeout=max(deadline - time.monotonic(), RETRY_S))
        if reason is None:
            return
        if time.monotonic() + RETRY_S >= deadline:
            raise SetupError(
                f"{label}: no scheduler answers ({reason}): start it "
                "(`dask scheduler`) or fix the address",
                UNAVAILABLE,
            )
        time.sleep(RETRY_S)  # a scheduler started alongside us may not listen yet


def connect_error(label: str, host_port: tuple[str, int], timeout: float) -> str | None:
    """Why a TCP connection to ``host_port`` failed, or None when it was accepted."""
    try:
        with socket.create_connection(host_port, timeout=timeout):
            return None
    except socket.gaierror as exc:  # no point retrying a name that does not resolve
        raise SetupError(
            f"{label}: cannot resolve {host_port[0]} ({exc.strerror}); check the address",
            UNAVAILABLE,
        ) from exc
    except OSError as exc:
        return exc.strerror or type(exc).__name__


# --- TLS -----------------------------------------------------------------------------------


def check_tls(label: str, address: str, files: Mapping[str, tuple[str, str]]) -> None:
    """The client's TLS files fit the scheduler's address and are usable; ``files``: field
    name -> (where it was given: a flag or a Dask config key, path or PEM text)."""
    flags = [where for where, _ in files.values() if where.startswith("--")]
    if urlsplit(address).scheme != "tls":
        if flags:  # Dask's config may hold files for other clusters; flags are for this one
            raise SetupError(
                f"{'/'.join(flags)} given but {label} is not a tls:// address: give the "
                "scheduler's tls:// address"
            )
        return
    if "tls_ca_file" not in files or "tls_cert" not in files:
        raise SetupError(
            f"{label} speaks TLS: give {TLS_FLAGS} (the cluster's CA, this client's "
            "certificate and key), or set Dask's distributed.comm.tls.* config"
        )
    check_tls_files(files)


def check_tls_files(files: Mapping[str, tuple[str, str]]) -> None:
    """Each file exists, the CA and the certificate are PEM and in date, and the key is the
    certificate's. PEM text (Dask's config may hold it inline) is left to Dask."""
    paths = {name: pair for name, pair in files.items() if "\n" not in pair[1]}
    for where, path in paths.values():
        if not os.path.isfile(path):
            raise SetupError(f"{where} {path}: no such file")
        if not os.access(path, os.R_OK):
            raise SetupError(f"{where} {path}: permission denied; give a file you can read")
    if "tls_ca_file" in paths:
        where, path = paths["tls_ca_file"]
        try:
            ssl.create_default_context(cafile=path)
        except ssl.SSLError as exc:
            raise SetupError(
                f"{where} {path} holds no PEM certificate ({exc.reason}): give the cluster "
                "CA's certificate"
            ) from exc
        check_dates(where, path)
    if "tls_cert" in paths:
        check_key_pair(paths["tls_cert"], paths.get("tls_key"))
        check_dates(*paths["tls_cert"])


def check_key_pair(cert: tuple[str, str], key: tuple[str, str] | None) -> None:
    """The certificate and its key load together (the key may be in the certificate file)."""
    try:
        ssl.create_default_context().load_cert_chain(cert[1], key[1] if key else None)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH" and key is not None:
            raise SetupError(
                f"{key[0]} {key[1]} is not the key of {cert[0]} {cert[1]}: give the key the "
                "certificate was made with"
            ) from exc
        holder = f"{cert[0]} {cert[1]}" + (f" / {key[0]} {key[1]}" if key else "")
        raise SetupError(
            f"{holder}: not a PEM certificate and its private key ({exc.reason or exc}); "
            "give the client's certificate and unencrypted key"
        ) from exc


def check_dates(where: str, path: str) -> None:
    """The first certificate in the file is valid now."""
    from cryptography import x509  # only when a TLS file is given

    with open(path, "rb") as f:
        first = x509.load_pem_x509_certificates(f.read())[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    if first.not_valid_after_utc < now:
        day = first.not_valid_after_utc.date().isoformat()
        raise SetupError(f"{where} {path} expired on {day}: make a new certificate")
    if first.not_valid_before_utc > now:
        since = first.not_valid_before_utc.isoformat(timespec="minutes")
        raise SetupError(f"{where} {path} is not valid before {since}: check this clock")


def tls_refusal(exc: BaseException, label: str) -> SetupError | None:
    """The ``SetupError`` for distributed's error when a client's TLS settings and the
    scheduler's do not fit (see TLS_REFUSALS), None for any other error."""
    said = []
    seen: BaseException | None = exc
    while seen is not None and len(said) < 5:  # the SSL reason is often in the cause
        said.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = " ".join(said)
    for sign, reason in TLS_REFUSALS:
        if sign in text:
            return SetupError(f"{label}: {reason}")
    return None
