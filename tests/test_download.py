"""imgtasks.download over real sockets on 127.0.0.1, one test (at least) per status kind."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from certs import make_ca, make_cert

from imgtasks import download
from imgtasks.demo import DemoServer, ServerSettings
from imgtasks.demo.corpus import load_corpus
from imgtasks.download import (
    DEFAULT_DOWNLOAD,
    STATUSES,
    DownloadResult,
    DownloadSettings,
    fetch,
    fetch_many,
    host_concurrency,
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
    """Deterministic fake JPEG for the local server: SOI marker + pseudo-random payload."""
    seed = hashlib.sha256(str(i).encode()).digest()
    return (b"\xff\xd8\xff\xe0" + seed * (size // len(seed) + 1))[:size]


def demo_image(i: int) -> bytes:
    """What the demo server sends for /img/{i}.*."""
    images = load_corpus("photos")
    return images[i % len(images)].data


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoServer]:
    with DemoServer(ServerSettings(latency=0.0, jitter=0.0)) as server:
        yield server


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.headers: dict[str, dict[str, str]] = {}
        self.targets: list[str] = []  # request targets as sent: absolute through a proxy
        self.stop = threading.Event()


class _Handler(BaseHTTPRequestHandler):
    """What the demo server cannot show: request headers, concurrency, odd bodies."""

    protocol_version = "HTTP/1.1"
    state: _State  # set on the subclass per server

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        segments = [s for s in parts.path.split("/") if s]
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self.state.lock:
            self.state.headers[parts.path] = dict(self.headers.items())
            self.state.targets.append(self.path)
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

    @staticmethod
    def index(name: str) -> int:
        return int(name.split(".")[0])

    def route_img(self, rest: list[str], query: dict[str, str]) -> None:
        self.send_body(200, image_bytes(self.index(rest[0])))

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

    def route_chunked_cut(self, rest: list[str], query: dict[str, str]) -> None:
        # No Content-Length: a chunked body that stops before its terminating chunk.
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"400\r\n" + image_bytes(13, 1024) + b"\r\n")
        self.wfile.flush()
        self.close_connection = True

    def route_gzip(self, rest: list[str], query: dict[str, str]) -> None:
        body = gzip.compress(image_bytes(self.index(rest[0])))
        self.send_body(200, body, headers={"Content-Encoding": "gzip"})

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
    """Tiny threaded HTTP server for the checks that need server-side introspection."""

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

    def reset_concurrency(self) -> None:
        with self.state.lock:
            self.state.max_active = 0


@pytest.fixture(scope="module")
def local() -> Iterator[LocalServer]:
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


def test_ok_returns_exact_bytes(demo: DemoServer) -> None:
    url = f"{demo.base_url}/img/1.jpg"
    result = fetch(url, FAST)
    assert result.status == "ok" and result.ok
    assert result.content == demo_image(1)
    assert result.http_status == 200
    assert result.error == ""
    assert result.final_url == url
    assert result.content_type == "image/jpeg"
    assert result.attempts == 1
    assert result.elapsed_s >= 0


def test_gzip_content_encoding_is_decoded(local: LocalServer) -> None:
    result = fetch(f"{local.base_url}/gzip/2.jpg", FAST)
    assert result.status == "ok"
    assert result.content == image_bytes(2)


def test_user_agent_and_accept_sent(local: LocalServer) -> None:
    fetch(f"{local.base_url}/img/3.jpg", fast(user_agent="imgtasks-test/9"))
    headers = local.state.headers["/img/3.jpg"]
    assert headers["User-Agent"] == "imgtasks-test/9"
    assert headers["Accept"] == "image/*,*/*;q=0.8"
    assert DEFAULT_DOWNLOAD.user_agent.startswith("imgtasks/")


def test_404_is_http_4xx_without_retry(demo: DemoServer) -> None:
    result = fetch(f"{demo.base_url}/status/404", FAST)
    assert_failed(result, "http_4xx")
    assert result.http_status == 404
    assert result.error == "HTTP 404 Not Found"
    assert result.attempts == 1
    assert demo.request_counts()["/status/404"] == 1


def test_500_is_http_5xx_after_retries(demo: DemoServer) -> None:
    result = fetch(f"{demo.base_url}/status/500", FAST)
    assert_failed(result, "http_5xx")
    assert result.http_status == 500
    assert demo.request_counts()["/status/500"] == FAST.retries + 1
    assert result.attempts == FAST.retries + 1


def test_other_non_2xx_is_http_error(demo: DemoServer) -> None:
    # A redirect status without a Location header cannot be followed.
    result = fetch(f"{demo.base_url}/status/302", FAST)
    assert_failed(result, "http_error")
    assert result.http_status == 302


def test_503_twice_then_ok(demo: DemoServer) -> None:
    path = "/flaky/a503/2/503/4.jpg"
    result = fetch(f"{demo.base_url}{path}", fast(retries=3))
    assert result.status == "ok", result
    assert result.content == demo_image(4)
    assert result.attempts == 3
    assert demo.request_counts()[path] == 3


def test_429_retry_after_honoured_then_ok(demo: DemoServer) -> None:
    started = time.monotonic()
    result = fetch(f"{demo.base_url}/flaky/a429/1/429/5.jpg", FAST)
    assert result.status == "ok", result
    assert result.attempts == 2
    # Retry-After: 1 (capped at retry_after_max=1) was slept, not the 0.01 backoff.
    assert time.monotonic() - started >= 0.9


def test_408_is_retried(demo: DemoServer) -> None:
    path = "/flaky/a408/1/408/6.jpg"
    result = fetch(f"{demo.base_url}{path}", FAST)
    assert result.status == "ok", result
    assert demo.request_counts()[path] == 2


def test_drip_ends_as_timeout_at_deadline(demo: DemoServer) -> None:
    settings = fast(deadline=2.0)
    started = time.monotonic()
    result = fetch(f"{demo.base_url}/drip/7.jpg?rate=1024", settings)
    elapsed = time.monotonic() - started
    assert_failed(result, "timeout")
    assert result.http_status == 200
    assert "deadline" in result.error
    assert settings.deadline - 0.1 <= elapsed < settings.deadline + 3


def test_hang_with_small_read_timeout_is_timeout(demo: DemoServer) -> None:
    started = time.monotonic()
    result = fetch(f"{demo.base_url}/hang", fast(read_timeout=0.5))
    assert_failed(result, "timeout")
    assert time.monotonic() - started < 4


def test_hang_bounded_by_deadline(demo: DemoServer) -> None:
    started = time.monotonic()
    result = fetch(f"{demo.base_url}/hang", fast(read_timeout=20.0, deadline=1.0))
    assert_failed(result, "timeout")
    assert time.monotonic() - started < 4


def test_stalled_body_bounded_by_deadline(local: LocalServer) -> None:
    settings = fast(read_timeout=20.0, deadline=2.0)
    started = time.monotonic()
    result = fetch(f"{local.base_url}/stall?before=1", settings)
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


def test_short_body_is_incomplete_body(demo: DemoServer) -> None:
    result = fetch(f"{demo.base_url}/short/8.jpg", FAST)
    assert_failed(result, "incomplete_body")
    assert result.http_status == 200


def test_cut_chunked_body_is_incomplete_body(local: LocalServer) -> None:
    result = fetch(f"{local.base_url}/chunked-cut", FAST)
    assert_failed(result, "incomplete_body")


def test_empty_body(demo: DemoServer) -> None:
    result = fetch(f"{demo.base_url}/empty", FAST)
    assert_failed(result, "empty_body")
    assert result.http_status == 200


def test_too_large_from_content_length(demo: DemoServer) -> None:
    result = fetch(f"{demo.base_url}/img/9.jpg", fast(max_bytes=1000))
    assert_failed(result, "too_large")
    assert "Content-Length" in result.error


def test_too_large_while_streaming_without_length(demo: DemoServer) -> None:
    started = time.monotonic()
    url = f"{demo.base_url}/huge?bytes=20000000&length=0"
    result = fetch(url, fast(max_bytes=2**20))
    assert_failed(result, "too_large")
    assert "exceeded" in result.error
    assert time.monotonic() - started < 5


def test_redirects_followed(demo: DemoServer) -> None:
    result = fetch(f"{demo.base_url}/redirect/3/10.jpg", FAST)
    assert result.status == "ok", result
    assert result.content == demo_image(10)
    assert result.final_url == f"{demo.base_url}/img/10.jpg"
    assert result.url == f"{demo.base_url}/redirect/3/10.jpg"
    assert result.attempts == 4  # one request per hop


def test_redirect_loop_is_too_many_redirects(demo: DemoServer) -> None:
    result = fetch(f"{demo.base_url}/loop", FAST)
    assert_failed(result, "too_many_redirects")
    assert "loop" in result.error


def test_redirect_limit(demo: DemoServer) -> None:
    result = fetch(f"{demo.base_url}/redirect/9/11.jpg", fast(max_redirects=5))
    assert_failed(result, "too_many_redirects")
    assert "/img/11.jpg" not in demo.request_counts()
    ok = fetch(f"{demo.base_url}/redirect/5/11.jpg", fast(max_redirects=5))
    assert ok.status == "ok", ok


@pytest.mark.parametrize("target", ["ftp://example.com/x.jpg", "file:///etc/passwd", "http://"])
def test_redirect_to_invalid_url(demo: DemoServer, target: str) -> None:
    result = fetch(f"{demo.base_url}/redirect-to?url={quote(target, safe='')}", FAST)
    assert_failed(result, "invalid_url")
    assert "redirect to" in result.error
    assert result.http_status == 302
    assert result.final_url == target


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


def test_validate_url_refuses_every_whitespace_and_control_character() -> None:
    bad = [chr(c) for c in range(0x3100) if chr(c).isspace() or c < 32 or c == 127]
    assert {"\t", "\x00", "\x7f", "\x85", "\xa0", "\u2003", "\u3000"} <= set(bad)
    for char in bad:
        assert validate_url(f"http://example.com/a{char}b.jpg", 2048) is not None, repr(char)
    assert validate_url("http://example.com/\u00e9t\u00e9-\u65e5\u672c.jpg", 2048) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com",
        "HTTPS://Example.COM/a.jpg",
        "http://a.b/?x=1#f",
        "https://1.2.3.4/x",
        "http://-.-/",
        "https://example.com?q=a:b@c",
        "http://example.com#frag",
        "http://example.com/\u00e9.jpg",
    ],
)
def test_plain_urls_skip_urlsplit_only_where_it_would_find_nothing(url: str) -> None:
    assert download._PLAIN_URL.match(url)
    assert download._parsed_problem(url) is None
    assert validate_url(url, 2048) is None


@pytest.mark.parametrize(
    "url",
    ["http://example.com:0/a", "http://example.com:99999/a", "http://[::1/a", "ftp://a.b/",
     "http://user@:80/", "http:///a", "https://exa_mple.com/a", "http://\u00e9.com/"],
)  # fmt: skip
def test_other_urls_are_parsed(url: str) -> None:
    assert not download._PLAIN_URL.match(url)
    assert validate_url(url, 2048) == download._parsed_problem(url)


def test_per_host_cap(local: LocalServer) -> None:
    local.reset_concurrency()
    settings = fast(per_host=2, parallel=8)
    urls = [f"{local.base_url}/slow/{i}.jpg?s=0.3" for i in range(8)]
    results = fetch_many(urls, settings)
    assert [r.status for r in results] == ["ok"] * 8
    assert local.state.max_active == 2


def test_waits_for_a_host_slot_are_queued_not_network_time(local: LocalServer) -> None:
    # One slot, four 0.3 s requests: each waits for the ones before it. The waits are
    # queued_s; network_s is the request itself (lower bounds only: the server sleeps).
    urls = [f"{local.base_url}/slow/{i}.jpg?s=0.3" for i in range(4)]
    results = fetch_many(urls, fast(per_host=1, parallel=4))
    assert [r.status for r in results] == ["ok"] * 4
    assert all(r.network_s >= 0.29 for r in results)
    assert all(r.network_s + r.queued_s == pytest.approx(r.elapsed_s) for r in results)
    assert sorted(r.queued_s for r in results)[-1] >= 0.29 * 3  # the last waited for three
    assert sum(r.queued_s for r in results) >= 0.29 * (1 + 2 + 3)


def test_urls_that_wait_for_their_host_past_the_deadline_end_as_timeout(
    local: LocalServer,
) -> None:
    # One slot, 0.6 s requests, a 1 s deadline: the first is ok, the second starts with
    # 0.4 s left, the rest never get the slot and end at their deadline without a request.
    local.reset_concurrency()
    urls = [f"{local.base_url}/slow/{i}.jpg?s=0.6" for i in range(5)]
    results = fetch_many(urls, fast(per_host=1, per_host_fixed=True, parallel=5, deadline=1.0))
    assert [r.status for r in results] == ["ok"] + ["timeout"] * 4
    waited = [r for r in results if "waiting for a per-host slot" in r.error]
    assert len(waited) >= 2
    assert all(r.attempts == 0 and r.queued_s >= 0.99 for r in waited)
    assert local.state.max_active == 1


def test_fetch_many_concurrency(local: LocalServer) -> None:
    local.reset_concurrency()
    urls = [f"{local.base_url}/slow/{i}.jpg?s=0.3" for i in range(6)]
    results = fetch_many(urls, fast(parallel=8))
    assert [r.content for r in results] == [image_bytes(i) for i in range(6)]
    assert local.state.max_active >= 2


def test_fetch_many_keeps_input_order(demo: DemoServer) -> None:
    urls = [f"{demo.base_url}/img/{i}.jpg" for i in range(6)]
    urls.insert(2, "not a url")
    urls.insert(4, f"{demo.base_url}/status/410")
    results = fetch_many(urls, fast(parallel=4))
    assert [r.url for r in results] == urls
    assert [r.status for r in results] == ["ok", "ok", "invalid_url", "ok", "http_4xx"] + ["ok"] * 3
    assert results[0].content == demo_image(0)
    assert results[-1].content == demo_image(5)
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


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")


@pytest.mark.parametrize("proxied", [False, True])
def test_environment_is_read_once_unless_proxies_are_set(
    monkeypatch: pytest.MonkeyPatch, proxied: bool
) -> None:
    from imgtasks.download import _new_session

    for name in (*PROXY_VARIABLES, "all_proxy", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a bypass list alone is no proxy
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/custom-bundle.pem")
    if proxied:
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    session = _new_session(fast())
    # With a proxy, requests resolves it (and no_proxy) per URL; without, nothing per URL
    # comes from the environment, but the CA bundle it names is still the one verified with.
    assert session.trust_env is proxied
    if not proxied:
        assert session.verify == "/etc/ssl/custom-bundle.pem"


def test_a_proxy_from_the_environment_carries_the_image_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (*PROXY_VARIABLES, "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with LocalServer() as proxy:  # it routes an absolute target by its path
        monkeypatch.setenv("HTTP_PROXY", proxy.base_url)
        settings = fast(user_agent="proxied-test/1")  # a session of its own, made here
        result = fetch("http://images.invalid/img/7.jpg", settings)
    assert result.ok, result
    assert proxy.state.targets == ["http://images.invalid/img/7.jpg"]


@pytest.mark.parametrize("trusted", [True, False])
def test_https_verifies_the_server_with_the_ca_bundle_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, trusted: bool
) -> None:
    ca = make_ca(tmp_path / "ca")
    server_cert = make_cert(tmp_path / "server", "image-host", ca, ip="127.0.0.1")
    stranger = make_ca(tmp_path / "other", "another-ca")
    for name in (*PROXY_VARIABLES, "all_proxy", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str((ca if trusted else stranger).cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert.cert, server_cert.key)
    server = LocalServer()
    server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
    with server:
        url = server.base_url.replace("http://", "https://") + "/img/3.jpg"
        settings = fast(user_agent=f"tls-test-{trusted}/1")  # its own session, made here
        results = [fetch(url, settings) for _ in range(2)]
    if trusted:
        assert [r.content for r in results] == [image_bytes(3)] * 2
    else:  # an unknown issuer is refused, never read
        for result in results:
            assert_failed(result, "connection_error")
            assert "CERTIFICATE_VERIFY_FAILED" in result.error


def test_image_requests_reuse_one_connection_per_host(demo: DemoServer) -> None:
    settings = fast(user_agent="reuse-test/1")  # a session (and pools) of its own
    for index in range(12):
        assert fetch(f"{demo.base_url}/img/{index % 4}.jpg", settings).ok
    assert fetch(f"{demo.base_url}/missing.jpg", settings).status == "http_4xx"
    session = download.get_session(settings)
    pool = download._pool_for(session, session.get_adapter(demo.base_url), demo.base_url)
    # each answer went back to the pool once read (a read body) or dropped (a refusal)
    assert pool.num_connections == 1
    assert pool.pool is not None and pool.pool.qsize() == settings.per_host


def test_fetch_many_caps_each_call_at_parallel_and_reuses_its_threads(
    local: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a fresh pool: the process's own has run earlier tests' fetches, and a thread that
    # reaches its 500th here is renewed (keyedpool.RenewedThreads)
    monkeypatch.setattr(download, "_pool", None)
    local.reset_concurrency()
    urls = [f"{local.base_url}/slow/{i}.jpg?s=0.2" for i in range(9)]
    results = fetch_many(urls, fast(parallel=3, per_host=16))
    assert [r.content for r in results] == [image_bytes(i) for i in range(9)]
    assert local.state.max_active == 3  # one call: never more than `parallel` at once
    before = {t for t in threading.enumerate() if t.name.startswith("imgtasks-dl")}
    fetch_many(urls[:3], fast(parallel=3, per_host=16))
    after = {t for t in threading.enumerate() if t.name.startswith("imgtasks-dl")}
    assert len(before) >= 3  # kept after the call, idle, for the next one
    assert after == before  # the next batch ran on the same threads: none started


def test_a_batch_reports_its_hosts_limits(demo_server) -> None:
    settings = fast(per_host=64, per_host_start=4)
    urls = demo_server.urls(20)
    assert all(r.ok for r in fetch_many(urls, settings))
    never = "http://never-asked.example/a.jpg"
    hosts = host_concurrency([*urls, never, "http://bad-port.example:99999/x"], settings)
    assert list(hosts) == [f"127.0.0.1:{demo_server.port}"]  # only hosts it asked
    limit, in_flight = hosts[f"127.0.0.1:{demo_server.port}"]
    assert 4 < limit <= 64 and in_flight == 0  # grew from 4 while the host coped
