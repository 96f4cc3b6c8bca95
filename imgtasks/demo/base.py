"""What every demo-server route shares: the server's state and a request-handler base.

Apart from the route modules (`server`, `faults`, `imgur_api`) so each can import it
without importing the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import random
import threading
import time
from collections import Counter, OrderedDict, deque
from typing import TYPE_CHECKING, Any

from tornado.iostream import IOStream, StreamClosedError
from tornado.web import RequestHandler

from imgtasks.demo.corpus import CorpusItem, corrupt_jpeg, load_corpus
from imgtasks.demo.load import Load

if TYPE_CHECKING:
    from imgtasks.demo.server import ServerSettings

logger = logging.getLogger(__name__)

REQUEST_LOG_SIZE = 100_000
# Request counts are kept for the latest this many distinct paths. Unbounded, they grew
# with every URL served: 75 -> 215 MiB over a 1M-URL run (scale_bench's server process,
# session 17), and the main job embeds the server in its own process.
COUNTED_PATHS = 100_000


class State:
    """Everything handlers share.  Counters are read from other threads: lock them."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.images = load_corpus(settings.corpus)
        self.tiny = load_corpus("tiny")
        self._web: tuple[CorpusItem, ...] | None = None  # loaded on first use: web()
        self.jpegs = tuple(item for item in self.images if item.ext == "jpg") or self.tiny
        self._corrupted: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._counts: OrderedDict[str, int] = OrderedDict()  # least recently asked first
        # (monotonic time, Host header, path + query) of the latest requests: what a
        # politeness test checks (spacing per host, robots.txt asked once)
        self._log: deque[tuple[float, str, str]] = deque(maxlen=REQUEST_LOG_SIZE)
        self._fault_hits: Counter[str] = Counter()
        self._rng = random.Random(0)
        self.stopping = asyncio.Event()  # created inside the server loop
        self.detached: set[IOStream] = set()
        self.load = Load()  # requests in flight (ServerSettings.fragile acts on it)

    def web(self) -> tuple[CorpusItem, ...]:
        """The web-size corpus, loaded on first use (from the disk cache in ~0.1 s; the
        first time on a machine, generated in a few seconds), so servers that never serve
        ``/web/`` never pay for it."""
        if self._web is None:
            with self._lock:
                if self._web is None:
                    self._web = load_corpus("web")
        return self._web

    def count(self, uri: str, host: str = "") -> None:
        with self._lock:
            self._counts[uri] = self._counts.get(uri, 0) + 1
            self._counts.move_to_end(uri)
            if len(self._counts) > COUNTED_PATHS:
                self._counts.popitem(last=False)
            self._log.append((time.monotonic(), host, uri))

    def requests(self, prefix: str = "") -> list[tuple[float, str, str]]:
        with self._lock:
            return [entry for entry in self._log if entry[2].startswith(prefix)]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def hit(self, key: str) -> int:
        """Count a request for a stateful fault; returns how many so far (1 = first)."""
        with self._lock:
            self._fault_hits[key] += 1
            return self._fault_hits[key]

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._fault_hits.clear()
            self._log.clear()
        self.load.reset()

    def delay(self) -> float:
        s = self.settings
        return max(0.0, s.latency + self._rng.uniform(-s.jitter, s.jitter))

    def jpeg(self, index: int) -> CorpusItem:
        return self.jpegs[index % len(self.jpegs)]

    def corrupted(self, index: int) -> bytes:
        key = index % len(self.jpegs)
        if key not in self._corrupted:
            self._corrupted[key] = corrupt_jpeg(self.jpegs[key].data)
        return self._corrupted[key]


class Handler(RequestHandler):
    """Counts every request, applies latency, and streams bodies politely."""

    in_load = True  # counted in the host's requests in flight (not the introspection routes)

    def initialize(self, state: State) -> None:
        self.state = state
        self.closed = asyncio.Event()
        self.entered = False

    def compute_etag(self) -> str | None:
        return None  # no hashing of multi-MB bodies, no 304s

    def on_connection_close(self) -> None:
        self.closed.set()
        self._leave()

    def on_finish(self) -> None:
        self._leave()

    def _leave(self) -> None:
        if self.entered:
            self.entered = False
            self.state.load.leave()

    async def prepare(self) -> None:
        self.state.count(self.request.uri or "", self.request.host or "")
        over = 0
        if self.in_load:
            self.entered = True
            fragile = self.state.settings.fragile
            over = self.state.load.enter() - (fragile.above if fragile else 2**31)
        delay = self.state.delay() + self._slowdown(over)
        if delay > 0:
            await asyncio.sleep(delay)
        if over > 0 and not self._slowdown(over):
            self._refuse()

    def _slowdown(self, over: int) -> float:
        fragile = self.state.settings.fragile
        return fragile.slowdown * over if fragile is not None and over > 0 else 0.0

    def _refuse(self) -> None:
        """A fragile host over its limit: 429, finishing the request before its route."""
        fragile = self.state.settings.fragile
        assert fragile is not None
        self.state.load.refuse()
        retry = {} if fragile.retry_after is None else {"Retry_After": f"{fragile.retry_after:g}"}
        self.text(429, "too many requests at once\n", **retry)

    def text(self, status: int, body: str, **headers: str) -> None:
        self.set_status(status, reason=status_reason(status))
        for name, value in headers.items():
            self.set_header(name.replace("_", "-"), value)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(body.encode())

    async def send(self, data: bytes, content_type: str, rate: float | None = None) -> None:
        """Send ``data``; at ``rate`` (or the server bandwidth) bytes/s if set."""
        self.set_header("Content-Type", content_type)
        rate = rate or self.state.settings.bandwidth
        if rate is None or not data:
            self.finish(data)
            return
        self.set_header("Content-Length", str(len(data)))
        chunk = max(64, min(64 * 1024, int(rate / 10)))
        start = time.monotonic()
        for offset in range(0, len(data), chunk):
            piece = data[offset : offset + chunk]
            if not await self._write(piece):
                return
            # Pace against the start time so rounding errors do not accumulate.
            wait = start + (offset + len(piece)) / rate - time.monotonic()
            if wait > 0 and await self._stopped_within(wait):
                return
        self.finish()

    async def _write(self, piece: bytes) -> bool:
        """Write and flush; False when the client went away."""
        if self.closed.is_set() or self.state.stopping.is_set():
            return False
        try:
            self.write(piece)
            await self.flush()
        except StreamClosedError:
            return False
        return True

    async def _stopped_within(self, seconds: float) -> bool:
        """Sleep, waking early (and returning True) if the client or server goes away."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.state.stopping.wait(), seconds)
        return self.state.stopping.is_set() or self.closed.is_set()

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # A client hanging up mid-body is normal for this server, not an error.
        if isinstance(value, StreamClosedError):
            logger.debug("client went away: %s", self.request.uri)
            return
        super().log_exception(typ, value, tb)


def status_reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
