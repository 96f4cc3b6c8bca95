"""imgtasks.download over real sockets on 127.0.0.1, one test (at least) per status kind."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from imgtasks.download import (
    DEFAULT_DOWNLOAD,
    STATUSES,
    DownloadResult,
    DownloadSettings,
    fetch,
    fetch_many,
    validate_url,
)

# Fast settings: tiny backoff and Retry-After cap keep the module well under a minute.
FAST = DownloadSettings(
    connect_timeout=2.0,
    read_timeout=5.0,
    deadline=10.0,
    retries=2,
    backoff=0.01,
    backoff_jitter=0.0,
    retry_after_max=1,
)


def image_bytes(i: int, size: int = 20_000) -> bytes:
    """Deterministic fake JPEG: SOI marker + pseudo-random payload."""
    seed = hashlib.sha256(str(i).encode()).digest()
    return (b"\xff\xd8\xff\xe0" + seed * (size // len(seed) + 1))[:size]


# ------------------------------------------------------------------ test server


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.active = 0
        self.max_active = 0
        self.headers: dict[str, dict[str, str]] = {}
        self.stop = threading.Event()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _State  # set on the subclass per server

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        segments = [s for s in parts.path.split("/") if s]
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self.state.lock:
            self.state.counts[parts.path] += 1
            self.state.headers[parts.path] = dict(self.headers.items())
        route = getattr(self, f"route_{segments[0].replace('-', '_')}", None) if segments else None
        try:
            if route is None:
                self.send_body(404, b"not found", "text/plain")
            else:
                route(segments[1:], query)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def send_body(
        self, code: int, body: bytes, ctype: str = "image/jpeg", headers: dict | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_body(302, b"", "text/plain", {"Location": location})

    @staticmethod
    def index(name: str) -> int:
        return int(name.split(".")[0])

    def route_img(self, rest: list[str], query: dict[str, str]) -> None:
        self.send_body(200, image_bytes(self.index(rest[0])))

    def route_status(self, rest: list[str], query: dict[str, str]) -> None:
        self.send_body(int(rest[0]), b"status body", "text/plain")

    def route_flaky(self, rest: list[str], query: dict[str, str]) -> None:
        key, n, code, name = rest
        with self.state.lock:
            self.state.counts[f"flaky:{key}"] += 1
            seen = self.state.counts[f"flaky:{key}"]
        if seen <= int(n):
            extra = {"Retry-After": "1"} if int(code) in (429, 503) else {}
            self.send_body(int(code), b"try again", "text/plain", extra)
        else:
            self.send_body(200, image_bytes(self.index(name)))

    def route_drip(self, rest: list[str], query: dict[str, str]) -> None:
        rate = int(query.get("rate", "1024"))
        body = image_bytes(self.index(rest[0]))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        step = max(rate // 10, 1)
        for start in range(0, len(body), step):
            if self.state.stop.wait(0.1):
                return
            self.wfile.write(body[start : start + step])
            self.wfile.flush()

    def route_hang(self, rest: list[str], query: dict[str, str]) -> None:
        self.state.stop.wait(30)
        self.close_connection = True

    def route_stall(self, rest: list[str], query: dict[str, str]) -> None:
        # Slow headers, then half the body, then nothing: the body read must stop at the
        # deadline rather than after a full read_timeout.
        time.sleep(float(query.get("before", "1")))
        body = image_bytes(12)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.state.stop.wait(30)
        self.close_connection = True

    def route_short(self, rest: list[str], query: dict[str, str]) -> None:
        body = image_bytes(self.index(rest[0]))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True

    def route_chunked_cut(self, rest: list[str], query: dict[str, str]) -> None:
        # No Content-Length: a chunked body that stops before its terminating chunk.
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"400\r\n" + image_bytes(13, 1024) + b"\r\n")
        self.wfile.flush()
        self.close_connection = True

    def route_empty(self, rest: list[str], query: dict[str, str]) -> None:
        self.send_body(200, b"")

    def route_gzip(self, rest: list[str], query: dict[str, str]) -> None:
        body = gzip.compress(image_bytes(self.index(rest[0])))
        self.send_body(200, body, headers={"Content-Encoding": "gzip"})

    def route_redirect(self, rest: list[str], query: dict[str, str]) -> None:
        n, name = int(rest[0]), rest[1]
        self.redirect(f"/redirect/{n - 1}/{name}" if n > 1 else f"/img/{name}")

    def route_loop(self, rest: list[str], query: dict[str, str]) -> None:
        self.redirect("/loop2" if not rest else "/loop")

    def route_loop2(self, rest: list[str], query: dict[str, str]) -> None:
        self.redirect("/loop")

    def route_redirect_to(self, rest: list[str], query: dict[str, str]) -> None:
        self.redirect(query["url"])

    def route_huge(self, rest: list[str], query: dict[str, str]) -> None:
        size = int(query.get("bytes", "1000000"))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if query.get("length") != "0":
            self.send_header("Content-Length", str(size))
        else:
            self.send_header("Connection", "close")  # body ends when the socket closes
            self.close_connection = True
        self.end_headers()
        chunk = b"\0" * 65536
        sent = 0
        while sent < size and not self.state.stop.is_set():
            self.wfile.write(chunk[: size - sent])
            sent += len(chunk)

    def route_slow(self, rest: list[str], query: dict[str, str]) -> None:
        with self.state.lock:
            self.state.active += 1
            self.state.max_active = max(self.state.max_active, self.state.active)
        try:
            time.sleep(float(query.get("s", "0.3")))
        finally:
            with self.state.lock:
                self.state.active -= 1
        self.send_body(200, image_bytes(self.index(rest[0])))


class LocalServer:
    """Tiny threaded HTTP server with the demo-server routes these tests need."""

    def __init__(self) -> None:
        self.state = _State()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.state.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, path: str) -> int:
        with self.state.lock:
            return self.state.counts[path]

    def reset_concurrency(self) -> None:
        with self.state.lock:
            self.state.max_active = 0


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        yield srv


def fast(**changes: object) -> DownloadSettings:
    return dataclasses.replace(FAST, **changes)


def assert_failed(result: DownloadResult, status: str) -> None:
    assert result.status == status, result
    assert not result.ok
    assert result.content is None
    assert result.error


# ------------------------------------------------------------------------ tests


def test_ok_returns_exact_bytes(server: LocalServer) -> None:
    url = f"{server.base_url}/img/1.jpg"
    result = fetch(url, FAST)
    assert result.status == "ok" and result.ok
    assert result.content == image_bytes(1)
    assert result.http_status == 200
    assert result.error == ""
    assert result.final_url == url
    assert result.content_type == "image/jpeg"
    assert result.attempts == 1
    assert result.elapsed_s >= 0


def test_gzip_content_encoding_is_decoded(server: LocalServer) -> None:
    result = fetch(f"{server.base_url}/gzip/2.jpg", FAST)
    assert result.status == "ok"
    assert result.content == image_bytes(2)


def test_user_agent_and_accept_sent(server: LocalServer) -> None:
    fetch(f"{server.base_url}/img/3.jpg", fast(user_agent="imgtasks-test/9"))
    headers = server.state.headers["/img/3.jpg"]
    assert headers["User-Agent"] == "imgtasks-test/9"
    assert headers["Accept"] == "image/*,*/*;q=0.8"
    assert DEFAULT_DOWNLOAD.user_agent.startswith("imgtasks/")


def test_404_is_http_4xx_without_retry(server: LocalServer) -> None:
    result = fetch(f"{server.base_url}/status/404", FAST)
    assert_failed(result, "http_4xx")
    assert result.http_status == 404
    assert result.error == "HTTP 404 Not Found"
    assert result.attempts == 1
    assert server.count("/status/404") == 1


def test_500_is_http_5xx_after_retries(server: LocalServer) -> None:
    result = fetch(f"{server.base_url}/status/500", FAST)
    assert_failed(result, "http_5xx")
    assert result.http_status == 500
    assert server.count("/status/500") == FAST.retries + 1
    assert result.attempts == FAST.retries + 1


def test_other_non_2xx_is_http_error(server: LocalServer) -> None:
    # A redirect status without a Location header cannot be followed.
    result = fetch(f"{server.base_url}/status/302", FAST)
    assert_failed(result, "http_error")
    assert result.http_status == 302


def test_503_twice_then_ok(server: LocalServer) -> None:
    result = fetch(f"{server.base_url}/flaky/a503/2/503/4.jpg", fast(retries=3))
    assert result.status == "ok", result
    assert result.content == image_bytes(4)
    assert result.attempts == 3
    assert server.count("flaky:a503") == 3


def test_429_retry_after_honoured_then_ok(server: LocalServer) -> None:
    started = time.monotonic()
    result = fetch(f"{server.base_url}/flaky/a429/1/429/5.jpg", FAST)
    assert result.status == "ok", result
    assert result.attempts == 2
    # Retry-After: 1 (capped at retry_after_max=1) was slept, not the 0.01 backoff.
    assert time.monotonic() - started >= 0.9


def test_408_is_retried(server: LocalServer) -> None:
    result = fetch(f"{server.base_url}/flaky/a408/1/408/6.jpg", FAST)
    assert result.status == "ok", result
    assert server.count("flaky:a408") == 2


def test_drip_ends_as_timeout_at_deadline(server: LocalServer) -> None:
    settings = fast(deadline=2.0)
    started = time.monotonic()
    result = fetch(f"{server.base_url}/drip/7.jpg?rate=1024", settings)
    elapsed = time.monotonic() - started
    assert_failed(result, "timeout")
    assert result.http_status == 200
    assert "deadline" in result.error
    assert settings.deadline - 0.1 <= elapsed < settings.deadline + 3


def test_hang_with_small_read_timeout_is_timeout(server: LocalServer) -> None:
    started = time.monotonic()
    result = fetch(f"{server.base_url}/hang", fast(read_timeout=0.5))
    assert_failed(result, "timeout")
    assert time.monotonic() - started < 4


def test_hang_bounded_by_deadline(server: LocalServer) -> None:
    started = time.monotonic()
    result = fetch(f"{server.base_url}/hang", fast(read_timeout=20.0, deadline=1.0))
    assert_failed(result, "timeout")
    assert time.monotonic() - started < 4


def test_stalled_body_bounded_by_deadline(server: LocalServer) -> None:
    settings = fast(read_timeout=20.0, deadline=2.0)
    started = time.monotonic()
    result = fetch(f"{server.base_url}/stall?before=1", settings)
    assert_failed(result, "timeout")
    assert result.http_status == 200
    assert time.monotonic() - started < settings.deadline + 0.5


def test_connection_refused_is_connection_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = fetch(f"http://127.0.0.1:{port}/img/1.jpg", FAST)
    assert_failed(result, "connection_error")
    assert result.http_status is None
    assert result.attempts == FAST.retries + 1


def test_short_body_is_incomplete_body(server: LocalServer) -> None:
    result = fetch(f"{server.base_url}/short/8.jpg", FAST)
    assert_failed(result, "incomplete_body")
    assert result.http_status == 200


def test_cut_chunked_body_is_incomplete_body(server: LocalServer) -> None:
    result = fetch(f"{server.base_url}/chunked-cut", FAST)
    assert_failed(result, "incomplete_body")


def test_empty_body(server: LocalServer) -> None:
    result = fetch(f"{server.base_url}/empty", FAST)
    assert_failed(result, "empty_body")
    assert result.http_status == 200


def test_too_large_from_content_length(server: LocalServer) -> None:
    result = fetch(f"{server.base_url}/img/9.jpg", fast(max_bytes=1000))
    assert_failed(result, "too_large")
    assert "Content-Length" in result.error


def test_too_large_while_streaming_without_length(server: LocalServer) -> None:
    started = time.monotonic()
    url = f"{server.base_url}/huge?bytes=20000000&length=0"
    result = fetch(url, fast(max_bytes=2**20))
    assert_failed(result, "too_large")
    assert "exceeded" in result.error
    assert time.monotonic() - started < 5


def test_redirects_followed(server: LocalServer) -> None:
    result = fetch(f"{server.base_url}/redirect/3/10.jpg", FAST)
    assert result.status == "ok", result
    assert result.content == image_bytes(10)
    assert result.final_url == f"{server.base_url}/img/10.jpg"
    assert result.url == f"{server.base_url}/redirect/3/10.jpg"
    assert result.attempts == 4


def test_redirect_loop_is_too_many_redirects(server: LocalServer) -> None:
    result = fetch(f"{server.base_url}/loop", FAST)
    assert_failed(result, "too_many_redirects")
    assert "loop" in result.error


def test_redirect_limit(server: LocalServer) -> None:
    result = fetch(f"{server.base_url}/redirect/9/11.jpg", fast(max_redirects=5))
    assert_failed(result, "too_many_redirects")
    assert server.count("/img/11.jpg") == 0
    ok = fetch(f"{server.base_url}/redirect/5/11.jpg", fast(max_redirects=5))
    assert ok.status == "ok", ok


@pytest.mark.parametrize("target", ["ftp://example.com/x.jpg", "file:///etc/passwd", "http://"])
def test_redirect_to_invalid_url(server: LocalServer, target: str) -> None:
    result = fetch(f"{server.base_url}/redirect-to?url={quote(target, safe='')}", FAST)
    assert_failed(result, "invalid_url")
    assert "redirect to" in result.error
    assert result.http_status == 302


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "ftp://x",
        "file:///etc/passwd",
        "http://",
        "http://example.com/" + "a" * 3000,
        "http://example.com/with space.jpg",
        "http://example.com/tab\t.jpg",
        "http://[::1/x.jpg",
        "http://example.com:0/x.jpg",
        "http://example.com:99999/x.jpg",
        "",
    ],
)
def test_invalid_urls_make_no_request(url: str) -> None:
    assert validate_url(url, FAST.max_url_length) is not None
    result = fetch(url, FAST)
    assert_failed(result, "invalid_url")
    assert result.attempts == 0
    assert result.http_status is None


def test_validate_url_accepts_http_and_https() -> None:
    assert validate_url("http://example.com/a.jpg", 2048) is None
    assert validate_url("HTTPS://example.com:8443/a.jpg?x=1", 2048) is None
    assert validate_url("http://example.com/a.jpg", 10) is not None


def test_per_host_cap(server: LocalServer) -> None:
    server.reset_concurrency()
    settings = fast(per_host=2, parallel=8)
    urls = [f"{server.base_url}/slow/{i}.jpg?s=0.3" for i in range(8)]
    results = fetch_many(urls, settings)
    assert [r.status for r in results] == ["ok"] * 8
    assert server.state.max_active == 2


def test_fetch_many_order_and_concurrency(server: LocalServer) -> None:
    server.reset_concurrency()
    urls = [f"{server.base_url}/slow/{i}.jpg?s=0.3" for i in range(6)]
    urls.insert(2, "not a url")
    urls.insert(4, f"{server.base_url}/status/404")
    results = fetch_many(urls, fast(parallel=8))
    assert [r.url for r in results] == urls
    assert [r.status for r in results] == ["ok", "ok", "invalid_url", "ok", "http_4xx"] + ["ok"] * 3
    assert results[0].content == image_bytes(0)
    assert results[-1].content == image_bytes(5)
    assert server.state.max_active >= 2
    assert fetch_many([], FAST) == []


def test_every_status_kind_is_listed() -> None:
    assert set(STATUSES) >= {
        "ok",
        "invalid_url",
        "http_4xx",
        "http_5xx",
        "timeout",
        "connection_error",
        "too_large",
        "too_many_redirects",
        "incomplete_body",
        "empty_body",
    }


def test_settings_are_hashable_and_frozen() -> None:
    assert hash(fast()) == hash(fast())
    assert {FAST: 1}[fast()] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        FAST.retries = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "changes",
    [
        {"connect_timeout": 0},
        {"read_timeout": -1.0},
        {"deadline": 0},
        {"max_bytes": 0},
        {"retries": -1},
        {"backoff": -0.1},
        {"backoff_jitter": -1},
        {"retry_after_max": -1},
        {"max_redirects": -1},
        {"per_host": 0},
        {"parallel": 0},
        {"max_url_length": 0},
        {"retries": 1.5},
        {"user_agent": ""},
        {"user_agent": "bad\nagent"},
    ],
)
def test_settings_validation(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DownloadSettings(**changes)  # type: ignore[arg-type]
