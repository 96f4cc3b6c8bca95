"""Faults: the deterministic mix of misbehaving ``/img/`` URLs, and the hostile routes.

`Faults` says which ``/img/{i}.*`` URLs misbehave and how (`serve_fault` does it); the
handlers below each serve one failure mode the downloader must survive (error statuses,
flaky answers, slow or cut bodies, redirects, bombs, corrupt images), mounted by
`imgtasks.demo.server` from `FAULT_ROUTES`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import Counter
from dataclasses import dataclass

from tornado.iostream import StreamClosedError

from imgtasks.demo.base import Handler, status_reason
from imgtasks.demo.corpus import CorpusItem, make_bomb_png, truncate

FAULT_NAMES = (
    "not_found",
    "server_error",
    "flaky_503",
    "rate_limited",
    "drip",
    "truncated",
    "html",
)
TRUNCATE_FRACTION = 0.6
FLAKY_503_FAILURES = 2
RATE_LIMITED_FAILURES = 1
_HUGE_CHUNK = 64 * 1024
_HTML_PAGE = (
    b"<!doctype html>\n<html><head><title>Not an image</title></head>"
    b"<body><h1>Hello</h1><p>This page is HTML, not an image.</p></body></html>\n"
)


def _unit_hash(text: str) -> float:
    """A stable pseudo-random number in [0, 1) derived from ``text``."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class Faults:
    """Fractions of ``/img/`` URLs that misbehave; the rest are served normally.

    Which URL gets which fault depends only on its index (a hash of it), so runs are
    reproducible: ``fault_for(i)`` tells what ``/img/{i}.*`` will do.
    ``flaky_503`` answers 503 twice then the image; ``rate_limited`` answers 429 with
    ``Retry-After: 1`` once then the image (both counted per URL path);
    ``drip`` sends the body at ``drip_rate`` bytes/s.
    """

    not_found: float = 0.0
    server_error: float = 0.0
    flaky_503: float = 0.0
    rate_limited: float = 0.0
    drip: float = 0.0
    truncated: float = 0.0
    html: float = 0.0
    drip_rate: int = 1024

    def __post_init__(self) -> None:
        for name in FAULT_NAMES:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"fault fraction {name}={value!r} must be within [0, 1]")
        if sum(self.fractions().values()) > 1.0 + 1e-9:
            raise ValueError("fault fractions must sum to at most 1")
        if self.drip_rate <= 0:
            raise ValueError("drip_rate must be positive")

    def fractions(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in FAULT_NAMES}

    def fault_for(self, index: int) -> str | None:
        """The fault applied to ``/img/{index}.*``, or None when it is served normally."""
        u = _unit_hash(f"imgtasks-fault:{index}")
        edge = 0.0
        for name, fraction in self.fractions().items():
            edge += fraction
            if u < edge:
                return name
        return None

    def expected(self, count: int) -> dict[str, int]:
        """How many of the first ``count`` URLs get each fault (plus ``"ok"``)."""
        tally = Counter(self.fault_for(i) or "ok" for i in range(count))
        return {name: tally.get(name, 0) for name in (*FAULT_NAMES, "ok")}


NO_FAULTS = Faults()


async def serve_fault(handler: Handler, fault: str, item: CorpusItem) -> None:
    """Answer ``handler``'s ``/img/`` request for ``item`` the way ``fault`` says."""
    state = handler.state
    if fault == "not_found":
        handler.text(404, "not found\n")
    elif fault == "server_error":
        handler.text(500, "internal server error\n")
    elif fault == "flaky_503" and state.hit(handler.request.path) <= FLAKY_503_FAILURES:
        handler.text(503, "service unavailable\n", Retry_After="1")
    elif fault == "rate_limited" and state.hit(handler.request.path) <= RATE_LIMITED_FAILURES:
        handler.text(429, "too many requests\n", Retry_After="1")
    elif fault == "drip":
        await handler.send(item.data, item.content_type, state.settings.faults.drip_rate)
    elif fault == "truncated":
        await handler.send(truncate(item.data, TRUNCATE_FRACTION), item.content_type)
    elif fault == "html":
        await handler.send(_HTML_PAGE, "text/html; charset=utf-8")
    else:  # flaky/rate-limited URL past its failures
        await handler.send(item.data, item.content_type)


# --------------------------------------------------------------------------- routes


class _StatusHandler(Handler):
    async def get(self, code: str) -> None:
        status = int(code)
        if not 200 <= status <= 599:
            self.text(400, "status must be within 200..599\n")
        elif status in (204, 304):
            self.set_status(status)
            self.finish()
        else:
            self.text(status, f"{status} {status_reason(status)}\n")


class _FlakyHandler(Handler):
    async def get(self, _key: str, failures: str, code: str, index: str) -> None:
        status = int(code)
        if not 200 <= status <= 599:
            self.text(400, "status must be within 200..599\n")
            return
        if self.state.hit(self.request.path) <= int(failures):
            extra = {"Retry_After": "1"} if status in (429, 503) else {}
            self.text(status, f"{status} {status_reason(status)} (flaky)\n", **extra)
            return
        item = self.state.images[int(index) % len(self.state.images)]
        await self.send(item.data, item.content_type)


class _DripHandler(Handler):
    async def get(self, index: str) -> None:
        try:
            rate = float(self.get_argument("rate", "1024"))
        except ValueError:
            rate = -1.0
        if not (math.isfinite(rate) and rate > 0):
            self.text(400, "rate must be a positive number of bytes/s\n")
            return
        item = self.state.jpeg(int(index))
        await self.send(item.data, item.content_type, rate)


class _HangHandler(Handler):
    async def get(self) -> None:
        # Park until the client disconnects or the server stops; never answer.
        closed = asyncio.ensure_future(self.closed.wait())
        stopping = asyncio.ensure_future(self.state.stopping.wait())
        await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (closed, stopping):
            task.cancel()
        stream = self.detach()  # never send a response, just drop the connection
        stream.close()


class _TruncatedHandler(Handler):
    async def get(self, index: str) -> None:
        item = self.state.jpeg(int(index))
        await self.send(truncate(item.data, TRUNCATE_FRACTION), item.content_type)


class _ShortHandler(Handler):
    async def get(self, index: str) -> None:
        item = self.state.jpeg(int(index))
        # Tornado refuses to send fewer bytes than Content-Length, so write raw HTTP.
        head = (
            "HTTP/1.1 200 OK\r\n"
            f"Content-Type: {item.content_type}\r\n"
            f"Content-Length: {len(item.data)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        stream = self.detach()
        self.state.detached.add(stream)
        try:
            await stream.write(head + item.data[: len(item.data) // 2])
        except StreamClosedError:
            pass
        finally:
            self.state.detached.discard(stream)
            stream.close()


class _HtmlHandler(Handler):
    async def get(self) -> None:
        await self.send(_HTML_PAGE, "text/html; charset=utf-8")


class _EmptyHandler(Handler):
    async def get(self) -> None:
        self.set_header("Content-Type", "image/jpeg")
        self.finish(b"")


class _MislabeledHandler(Handler):
    async def get(self, index: str) -> None:
        await self.send(self.state.jpeg(int(index)).data, "text/plain")


class _RedirectHandler(Handler):
    async def get(self, hops: str, index: str) -> None:
        n, i = int(hops), int(index)
        if n <= 0:
            item = self.state.images[i % len(self.state.images)]
            await self.send(item.data, item.content_type)
        elif n == 1:
            self.redirect(f"/img/{i}.jpg")
        else:
            self.redirect(f"/redirect/{n - 1}/{i}.jpg")


class _LoopHandler(Handler):
    async def get(self) -> None:
        self.redirect("/loop")


class _RedirectToHandler(Handler):
    async def get(self) -> None:
        target = self.get_argument("url", "")
        if not target or any(c in target for c in "\r\n"):
            self.text(400, "need a url parameter without CR/LF\n")
            return
        self.redirect(target)


class _BombHandler(Handler):
    async def get(self) -> None:
        await self.send(make_bomb_png(), "image/png")


class _HugeHandler(Handler):
    _chunk = b"\xff\xd8\xff\xe0" + bytes(range(256)) * (_HUGE_CHUNK // 256 - 1) + b"\x00" * 252

    async def get(self) -> None:
        try:
            total = int(self.get_argument("bytes", str(100 * 2**20)))
        except ValueError:
            total = -1
        if total < 0:
            self.text(400, "bytes must be a non-negative integer\n")
            return
        self.set_header("Content-Type", "image/jpeg")
        if self.get_argument("length", "1") != "0":
            self.set_header("Content-Length", str(total))
        # Generated chunk by chunk; flush() waits for the socket, bounding memory.
        sent = 0
        while sent < total:
            piece = self._chunk[: min(_HUGE_CHUNK, total - sent)]
            if not await self._write(piece):
                return
            sent += len(piece)
        self.finish()


class _CorruptHandler(Handler):
    async def get(self, index: str) -> None:
        await self.send(self.state.corrupted(int(index)), "image/jpeg")


class _AnyHandler(Handler):
    async def get(self) -> None:
        # The raw (still percent-encoded) path: no decoding, so any bytes are fine.
        path = self.request.path
        images = self.state.images
        item = images[int(_unit_hash(path) * len(images))]
        await self.send(item.data, item.content_type)


FAULT_ROUTES = [
    (r"/status/(\d{3})", _StatusHandler),
    (r"/flaky/([^/]+)/(\d{1,9})/(\d{3})/(\d{1,18})\.jpg", _FlakyHandler),
    (r"/drip/(\d{1,18})\.jpg", _DripHandler),
    (r"/hang", _HangHandler),
    (r"/truncated/(\d{1,18})\.jpg", _TruncatedHandler),
    (r"/short/(\d{1,18})\.jpg", _ShortHandler),
    (r"/html", _HtmlHandler),
    (r"/empty", _EmptyHandler),
    (r"/mislabeled/(\d{1,18})\.jpg", _MislabeledHandler),
    (r"/redirect/(\d{1,4})/(\d{1,18})\.jpg", _RedirectHandler),
    (r"/loop", _LoopHandler),
    (r"/redirect-to", _RedirectToHandler),
    (r"/bomb\.png", _BombHandler),
    (r"/huge", _HugeHandler),
    (r"/corrupt/(\d{1,18})\.jpg", _CorruptHandler),
    (r"/any/.*", _AnyHandler),
]
