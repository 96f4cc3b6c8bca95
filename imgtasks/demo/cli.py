"""The demo server's command line (`main`) and `server_process`, which runs it as a
process of its own: ``python -m imgtasks.demo --port 8000``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import math
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from imgtasks.demo.faults import FAULT_NAMES, Faults
from imgtasks.demo.load import Fragility
from imgtasks.demo.server import DEFAULT_SETTINGS, URL_KINDS, DemoServer, ServerSettings

logger = logging.getLogger(__name__)

ROUTES_HELP = """\
GET /img/{i}.{ext}              corpus item i % len(corpus) (faults apply here)
GET /tiny/{i}.jpg               tiny corpus item
GET /web/{i}.{ext}              web-size corpus item i % 300 (512 px, ~20-60 KB JPEG/PNG/WebP)
GET /urls?count=N&kind=photos   one absolute URL per line (kind: photos | tiny | web)
GET /status/{code}              that status code
GET /flaky/{key}/{n}/{code}/{i}.jpg   first n requests -> code, then image i
GET /drip/{i}.jpg?rate=1024     body sent at rate bytes/s
GET /hang                       never answers
GET /truncated/{i}.jpg          first 60% of a JPEG, honest Content-Length
GET /short/{i}.jpg              full Content-Length, half the body, then close
GET /html  /empty  /mislabeled/{i}.jpg
GET /redirect/{n}/{i}.jpg  /loop  /redirect-to?url=X
GET /bomb.png                   decompression bomb (20000x20000 PNG)
GET /huge?bytes=N[&length=0]    N streamed bytes (chunked if length=0)
GET /corrupt/{i}.jpg            JPEG that fails to decode
GET /files/{name}               bytes of file {name} in --files-dir (names [A-Za-z0-9._-],
                                no leading dot, no subdirectories; else 404)
GET /any/{anything}             an image chosen by a hash of the raw path
GET /stats                      JSON request counts
GET /robots.txt                 --robots-txt FILE's text with --robots-status (else 404)
GET /robots-tag/{i}.jpg?h=V&h=W a JPEG with one X-Robots-Tag header per h value
GET /requests?prefix=P          JSON [seconds, host, path] of the latest requests
GET /load                       JSON requests in flight, peak, 429s sent (--fragile-above),
                                and [seconds, in flight] at each arrival
GET /imgur[/OPTS]/3/gallery/{section}/{sort}/{window}/{page}
                                fake Imgur API (needs Authorization: Client-ID X);
                                OPTS: pages=3,per_page=60,key=K,client_id=X,
                                retry_after=S,reset_in=S,client_remaining=N
"""


def _fraction_arg(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or name not in FAULT_NAMES:
        raise argparse.ArgumentTypeError(f"expected NAME=FRACTION with NAME in {FAULT_NAMES}")
    try:
        return name, float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad fraction {value!r}") from exc


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgtasks-demo-server",
        description="Serve a deterministic photo-like image corpus with latency and faults.",
        epilog=ROUTES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default=DEFAULT_SETTINGS.host)
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--latency", type=_non_negative, default=DEFAULT_SETTINGS.latency)
    parser.add_argument("--jitter", type=_non_negative, default=DEFAULT_SETTINGS.jitter)
    parser.add_argument("--bandwidth", type=_non_negative, default=None, help="bytes/s")
    parser.add_argument("--corpus", choices=tuple(URL_KINDS), default="photos")
    parser.add_argument(
        "--count", type=int, default=1000, help="URL count shown in the startup hint"
    )
    parser.add_argument(
        "--files-dir", default=None, metavar="DIR", help="serve DIR's files at /files/{name}"
    )
    parser.add_argument(
        "--robots-txt", default=None, metavar="FILE", help="serve FILE's text at /robots.txt"
    )
    parser.add_argument("--robots-status", type=int, default=200, help="HTTP status of /robots.txt")
    parser.add_argument(
        "--fragile-above",
        type=int,
        metavar="K",
        help="a fragile host: 429 to requests beyond K in flight at once",
    )
    parser.add_argument(
        "--fragile-retry-after", type=_non_negative, metavar="S", help="Retry-After of those 429s"
    )
    parser.add_argument(
        "--hosts",
        type=int,
        default=1,
        metavar="N",
        help="serve N hosts: --host and the next N-1 addresses (127.0.0.1, 127.0.0.2, ...), "
        "one port, each with the same settings",
    )
    parser.add_argument(
        "--fault",
        type=_fraction_arg,
        action="append",
        default=[],
        metavar="NAME=FRACTION",
        help=f"fault fraction for /img/ URLs, NAME in {', '.join(FAULT_NAMES)}",
    )
    return parser


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


@contextlib.contextmanager
def server_process(
    latency: float, jitter: float = 0.02, *extra: str, start_timeout: float = 180.0
) -> Iterator[tuple[str, int]]:
    """``python -m imgtasks.demo`` as a process of its own, on a free port of
    127.0.0.1; yields its base URL and pid. For benchmarks, whose measured processes must
    not pay for the server's CPU. Stopped with Ctrl-C (then killed) on exit."""
    cmd = [sys.executable, "-m", "imgtasks.demo", "--port", "0"]
    cmd += ["--latency", str(latency), "--jitter", str(jitter), *extra]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            yield _served_url(proc, log, start_timeout), proc.pid
        finally:
            _stop(proc)


def _served_url(proc: subprocess.Popen, log: Any, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.seek(0)
        text = log.read()
        match = re.search(r"serving (http://\S+)", text)
        if match:
            return match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"demo server exited: {text.strip()[-300:]}")
        time.sleep(0.1)
    raise RuntimeError(f"demo server did not start in {timeout:g} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: serve until Ctrl-C."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = ServerSettings(
            host=args.host,
            port=args.port,
            latency=args.latency,
            jitter=args.jitter,
            bandwidth=args.bandwidth or None,
            faults=Faults(**dict(args.fault)),
            corpus=args.corpus,
            files_dir=args.files_dir,
            robots_txt=_read_text(args.robots_txt),
            robots_status=args.robots_status,
            fragile=Fragility(args.fragile_above, args.fragile_retry_after)
            if args.fragile_above is not None
            else None,
        )
        if args.hosts < 1:
            raise ValueError("--hosts must be >= 1")
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    servers: list[DemoServer] = []
    try:
        for host in neighbour_addresses(args.host, args.hosts):
            port = servers[0].port if servers else args.port
            servers.append(DemoServer(replace(settings, host=host, port=port)).start())
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        _stop_all(servers)
        return 1
    first = servers[0].base_url
    logger.info("serving %s  (try: GET %s/urls?count=%d)", first, first, args.count)
    for other in servers[1:]:
        logger.info("also serving %s", other.base_url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        _stop_all(servers)
    return 0


def neighbour_addresses(first: str, count: int) -> list[str]:
    """``first`` and the ``count - 1`` IPv4 addresses after it (127.0.0.1 -> .2, .3, ...)."""
    if count == 1:
        return [first]
    start = ipaddress.IPv4Address(first)
    return [str(start + i) for i in range(count)]


def _stop_all(servers: Sequence[DemoServer]) -> None:
    for server in servers:
        server.stop()
