"""The demo image server: settings, the tornado app, the image routes and `DemoServer`.

The server runs tornado on its own asyncio loop in a background thread and binds
127.0.0.1 on a free port by default.  Bodies are served from memory; latency is an
``asyncio.sleep`` so hundreds of concurrent requests cost nothing.  Besides ``/img/``
(optionally with a deterministic mix of faults, see `Faults`) it has one route per
failure mode the downloader must survive (`imgtasks.demo.faults`) and a fake Imgur API
(`imgtasks.demo.imgur_api`); ``imgtasks.demo.cli.ROUTES_HELP`` lists them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from imgtasks.demo.base import Handler, State
from imgtasks.demo.faults import FAULT_ROUTES, Faults, serve_fault
from imgtasks.demo.imgur_api import imgur_route
from imgtasks.demo.load import Fragility, Load

logger = logging.getLogger(__name__)

URL_KINDS = {"photos": "img", "tiny": "tiny", "web": "web"}  # url kind -> route prefix
MAX_URL_COUNT = 10_000_000
_STOP_TIMEOUT = 5.0
# /files/ names: one plain file name, no path separators, no leading dot (so no "..").
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


@dataclass(frozen=True)
class ServerSettings:
    """Where to listen and how slow to be.  ``bandwidth`` is bytes/s per response.

    ``files_dir``: a directory whose plain files ``/files/{name}`` serves as they are.
    ``robots_txt``: the body of ``/robots.txt`` (None: 404), sent with ``robots_status``.
    ``fragile``: a host that answers 429 (or slows down) beyond K requests in flight.
    A host is one address: several hosts are several servers, on 127.0.0.2 and up (Linux
    routes all of 127/8 to the loopback interface), each with its own settings.
    """

    host: str = "127.0.0.1"
    port: int = 0
    latency: float = 0.1
    jitter: float = 0.02
    bandwidth: float | None = None
    faults: Faults = field(default_factory=Faults)
    corpus: str = "photos"
    files_dir: str | None = None
    robots_txt: str | None = None
    robots_status: int = 200
    fragile: Fragility | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within 0..65535, got {self.port}")
        if not (math.isfinite(self.latency) and self.latency >= 0):
            raise ValueError("latency must be a finite number >= 0")
        if not (math.isfinite(self.jitter) and self.jitter >= 0):
            raise ValueError("jitter must be a finite number >= 0")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise ValueError("bandwidth must be positive or None")
        if self.corpus not in URL_KINDS:
            raise ValueError(f"corpus must be one of {tuple(URL_KINDS)}")
        if self.files_dir is not None and not os.path.isdir(self.files_dir):
            raise ValueError(f"files_dir must be an existing directory; got {self.files_dir!r}")


DEFAULT_SETTINGS = ServerSettings()


def _url_path(state: State, kind: str, index: int) -> str:
    if kind == "tiny":
        return f"/tiny/{index}.jpg"
    if kind == "web":
        web = state.web()
        return f"/web/{index}.{web[index % len(web)].ext}"
    return f"/img/{index}.{state.images[index % len(state.images)].ext}"


# --------------------------------------------------------------------------- routes


class _ImgHandler(Handler):
    async def get(self, index: str, _ext: str) -> None:
        i = int(index)
        item = self.state.images[i % len(self.state.images)]
        fault = self.state.settings.faults.fault_for(i)
        if fault is None:
            await self.send(item.data, item.content_type)
        else:
            await serve_fault(self, fault, item)


class _TinyHandler(Handler):
    async def get(self, index: str) -> None:
        item = self.state.tiny[int(index) % len(self.state.tiny)]
        await self.send(item.data, item.content_type)


class _WebHandler(Handler):
    async def get(self, index: str, _ext: str) -> None:
        web = self.state.web()
        item = web[int(index) % len(web)]
        await self.send(item.data, item.content_type)


class _UrlsHandler(Handler):
    async def get(self) -> None:
        kind = self.get_argument("kind", "photos")
        try:
            count = int(self.get_argument("count", "100"))
        except ValueError:
            count = -1
        if kind not in URL_KINDS or not 0 <= count <= MAX_URL_COUNT:
            self.text(400, f"need count in 0..{MAX_URL_COUNT} and kind in {tuple(URL_KINDS)}\n")
            return
        base = f"{self.request.protocol}://{self.request.host}"
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        # Stream in blocks so a 10M-line list never sits in memory.
        for start in range(0, count, 10_000):
            block = "".join(
                f"{base}{_url_path(self.state, kind, i)}\n"
                for i in range(start, min(count, start + 10_000))
            )
            if not await self._write(block.encode()):
                return
        self.finish()


class _FilesHandler(Handler):
    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        # Not UTF-8 is just a name that matches no file: 404 like any other, not 400.
        return value.decode("utf-8", "replace")

    async def get(self, name: str) -> None:
        path = _served_file(self.state.settings.files_dir, name)
        if path is None:
            self.text(404, "no such file\n")
            return
        try:
            data = await asyncio.to_thread(path.read_bytes)  # off the loop: other requests go on
        except OSError:
            self.text(404, "no such file\n")
            return
        await self.send(data, "application/octet-stream")


def _served_file(files_dir: str | None, name: str) -> Path | None:
    """``files_dir/name`` when ``name`` is a safe plain name of a regular file, else None.

    ``name`` arrives percent-decoded, so ``..%2F`` is ``../`` here: the pattern refuses
    any separator or leading dot, and a symlink (which could point anywhere) is refused.
    """
    if files_dir is None or not _FILE_NAME.fullmatch(name):
        return None
    path = Path(files_dir, name)
    return path if path.is_file() and not path.is_symlink() else None


class _RobotsTxtHandler(Handler):
    async def get(self) -> None:
        settings = self.state.settings
        if settings.robots_txt is None:
            self.text(404, "no robots.txt here\n")
        else:
            self.text(settings.robots_status, settings.robots_txt)


class _RobotsTagHandler(Handler):
    """``/robots-tag/N.jpg?h=noai&h=otherbot:+noindex``: a JPEG with one X-Robots-Tag
    header per ``h`` value, in order (a site opting out of AI training)."""

    async def get(self, index: str) -> None:
        for value in self.get_arguments("h", strip=False):
            self.add_header("X-Robots-Tag", value)
        item = self.state.jpeg(int(index))
        await self.send(item.data, item.content_type)


class _RequestsHandler(Handler):
    """``/requests?prefix=/img/``: the latest requests as JSON, [seconds, host, path]."""

    in_load = False

    async def get(self) -> None:
        prefix = self.get_argument("prefix", "")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(self.state.requests(prefix)))


class _LoadHandler(Handler):
    """``/load``: requests in flight now, the peak, the 429s a fragile host sent, and
    [seconds, in flight] at every arrival, as JSON."""

    in_load = False

    async def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(self.state.load.figures()))


class _StatsHandler(Handler):
    in_load = False

    async def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"requests": self.state.counts()}, sort_keys=True))


class _NotFoundHandler(Handler):
    async def get(self, *_args: str) -> None:
        self.text(404, "no such route\n")


def _make_app(state: State) -> Application:
    kw = {"state": state}
    routes = [
        (r"/img/(\d{1,18})\.(\w+)", _ImgHandler, kw),
        (r"/tiny/(\d{1,18})\.jpg", _TinyHandler, kw),
        (r"/web/(\d{1,18})\.(\w+)", _WebHandler, kw),
        (r"/urls", _UrlsHandler, kw),
        *((pattern, handler, kw) for pattern, handler in FAULT_ROUTES),
        (r"/files/(.*)", _FilesHandler, kw),
        (r"/robots\.txt", _RobotsTxtHandler, kw),
        (r"/robots-tag/(\d{1,18})\.jpg", _RobotsTagHandler, kw),
        (r"/requests", _RequestsHandler, kw),
        (r"/stats", _StatsHandler, kw),
        (r"/load", _LoadHandler, kw),
        imgur_route(state),
    ]
    return Application(
        routes,
        default_handler_class=_NotFoundHandler,
        default_handler_args=kw,
        log_function=_log_request,
        compress_response=False,
    )


def _log_request(handler: RequestHandler) -> None:
    # Per-request lines would drown everything else; keep them at DEBUG.
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "%d %s %.1fms",
            handler.get_status(),
            handler.request.uri,
            1000 * handler.request.request_time(),
        )


# --------------------------------------------------------------------------- server


class DemoServer:
    """Serve the corpus on a background thread; use as a context manager.

    >>> with DemoServer(ServerSettings(latency=0)) as server:  # doctest: +SKIP
    ...     urls = server.urls(100)
    """

    def __init__(self, settings: ServerSettings = DEFAULT_SETTINGS) -> None:
        self.settings = settings
        self._state: State | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._port: int | None = None

    # -- lifecycle

    def start(self, timeout: float = 120.0) -> DemoServer:
        """Load the corpus, bind and start serving; returns self."""
        if self._thread is not None:
            raise RuntimeError("DemoServer already started")
        self._state = State(self.settings)  # may generate the corpus (slow, once)
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="imgtasks-demo-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("demo server did not start in time")
        if self._error is not None:
            self._thread.join(_STOP_TIMEOUT)
            self._thread = None
            raise self._error
        logger.debug("demo server listening on %s", self.base_url)
        return self

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop listening, drop open connections (even hanging ones) and join the thread."""
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already gone
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("demo server thread did not stop within %.1f s", timeout)
        self._thread = self._loop = self._stop_event = None
        self._port = None

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surface bind errors etc. to start()
            self._error = exc
            logger.debug("demo server loop failed", exc_info=True)
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        state = self._state
        assert state is not None
        state.stopping = asyncio.Event()
        self._stop_event = asyncio.Event()
        server = HTTPServer(_make_app(state), idle_connection_timeout=60)
        sockets = bind_sockets(self.settings.port, address=self.settings.host, backlog=1024)
        server.add_sockets(sockets)
        self._port = sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        await self._stop_event.wait()
        server.stop()  # closes the listening sockets: the port is free again
        state.stopping.set()  # wakes /hang, /drip and throttled bodies
        for stream in list(state.detached):
            stream.close()
        try:
            await asyncio.wait_for(server.close_all_connections(), _STOP_TIMEOUT / 2)
        except asyncio.TimeoutError:
            logger.warning("some demo server connections did not close in time")

    # -- info

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("DemoServer is not running")
        return self._port

    @property
    def base_url(self) -> str:
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def urls(self, count: int, kind: str = "photos") -> list[str]:
        """The first ``count`` URLs (same list as ``GET /urls``); kind: photos | tiny | web."""
        if kind not in URL_KINDS:
            raise ValueError(f"kind must be one of {tuple(URL_KINDS)}")
        if count < 0:
            raise ValueError("count must be >= 0")
        base, state = self.base_url, self._require_state()
        return [f"{base}{_url_path(state, kind, i)}" for i in range(count)]

    def file_url(self, name: str) -> str:
        """The URL of ``/files/{name}`` (a file in ``settings.files_dir``)."""
        return f"{self.base_url}/files/{name}"

    def request_counts(self) -> dict[str, int]:
        """Requests received so far, keyed by path + query string: of the latest
        ``base.COUNTED_PATHS`` (100,000) distinct ones, so a long run does not grow it."""
        return self._require_state().counts()

    def request_log(self, prefix: str = "") -> list[tuple[float, str, str]]:
        """The latest requests whose path starts with ``prefix``: (monotonic seconds,
        Host header, path + query), oldest first."""
        return self._require_state().requests(prefix)

    @property
    def load(self) -> Load:
        """Requests in flight on this host, their peak and log, the 429s it sent."""
        return self._require_state().load

    def reset_counts(self) -> None:
        """Forget request counts and flaky/rate-limit state (faults start over)."""
        self._require_state().reset()

    def _require_state(self) -> State:
        if self._state is None:
            raise RuntimeError("DemoServer was never started")
        return self._state
