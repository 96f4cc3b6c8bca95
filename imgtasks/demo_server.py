"""A local HTTP server that serves the deterministic corpus with latency and faults.

The server runs tornado on its own asyncio loop in a background thread and binds
127.0.0.1 on a free port by default.  Bodies are served from memory; latency is an
``asyncio.sleep`` so hundreds of concurrent requests cost nothing.  Besides ``/img/``
(optionally with a deterministic mix of faults, see `Faults`) it has one route per
failure mode the downloader must survive; see ``ROUTES_HELP`` or ``docs``.

Run it standalone with ``python -m imgtasks.demo_server --port 8000``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from imgtasks.demo.corpus import CorpusItem, corrupt_jpeg, load_corpus, make_bomb_png, truncate

logger = logging.getLogger(__name__)

FAULT_NAMES = (
    "not_found",
    "server_error",
    "flaky_503",
    "rate_limited",
    "drip",
    "truncated",
    "html",
)
URL_KINDS = {"photos": "img", "tiny": "tiny"}  # url kind -> route prefix
MAX_URL_COUNT = 10_000_000
TRUNCATE_FRACTION = 0.6
FLAKY_503_FAILURES = 2
RATE_LIMITED_FAILURES = 1
_HUGE_CHUNK = 64 * 1024
_STOP_TIMEOUT = 5.0
# /files/ names: one plain file name, no path separators, no leading dot (so no "..").
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_HTML_PAGE = (
    b"<!doctype html>\n<html><head><title>Not an image</title></head>"
    b"<body><h1>Hello</h1><p>This page is HTML, not an image.</p></body></html>\n"
)

ROUTES_HELP = """\
GET /img/{i}.{ext}              corpus item i % len(corpus) (faults apply here)
GET /tiny/{i}.jpg               tiny corpus item
GET /urls?count=N&kind=photos   one absolute URL per line (kind: photos | tiny)
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
GET /imgur[/OPTS]/3/gallery/{section}/{sort}/{window}/{page}
                                fake Imgur API (needs Authorization: Client-ID X);
                                OPTS: pages=3,per_page=60,key=K,client_id=X,
                                retry_after=S,reset_in=S,client_remaining=N
"""


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


@dataclass(frozen=True)
class ServerSettings:
    """Where to listen and how slow to be.  ``bandwidth`` is bytes/s per response.

    ``files_dir``: a directory whose plain files ``/files/{name}`` serves as they are.
    """

    host: str = "127.0.0.1"
    port: int = 0
    latency: float = 0.1
    jitter: float = 0.02
    bandwidth: float | None = None
    faults: Faults = field(default_factory=Faults)
    corpus: str = "photos"
    files_dir: str | None = None

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


class _State:
    """Everything handlers share.  Counters are read from other threads: lock them."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.images = load_corpus(settings.corpus)
        self.tiny = load_corpus("tiny")
        self.jpegs = tuple(item for item in self.images if item.ext == "jpg") or self.tiny
        self._corrupted: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._fault_hits: Counter[str] = Counter()
        self._rng = random.Random(0)
        self.stopping = asyncio.Event()  # created inside the server loop
        self.detached: set[IOStream] = set()

    def count(self, uri: str) -> None:
        with self._lock:
            self._counts[uri] += 1

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


def _url_path(state_images: Sequence[CorpusItem], kind: str, index: int) -> str:
    if kind == "tiny":
        return f"/tiny/{index}.jpg"
    return f"/img/{index}.{state_images[index % len(state_images)].ext}"


# --------------------------------------------------------------------------- handlers


class _Base(RequestHandler):
    """Counts every request, applies latency, and streams bodies politely."""

    def initialize(self, state: _State) -> None:
        self.state = state
        self.closed = asyncio.Event()

    def compute_etag(self) -> str | None:
        return None  # no hashing of multi-MB bodies, no 304s

    def on_connection_close(self) -> None:
        self.closed.set()

    async def prepare(self) -> None:
        self.state.count(self.request.uri or "")
        delay = self.state.delay()
        if delay > 0:
            await asyncio.sleep(delay)

    def text(self, status: int, body: str, **headers: str) -> None:
        self.set_status(status, reason=_reason(status))
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


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _ImgHandler(_Base):
    async def get(self, index: str, _ext: str) -> None:
        i = int(index)
        item = self.state.images[i % len(self.state.images)]
        fault = self.state.settings.faults.fault_for(i)
        if fault is None:
            await self.send(item.data, item.content_type)
        elif fault == "not_found":
            self.text(404, "not found\n")
        elif fault == "server_error":
            self.text(500, "internal server error\n")
        elif fault == "flaky_503" and self.state.hit(self.request.path) <= FLAKY_503_FAILURES:
            self.text(503, "service unavailable\n", Retry_After="1")
        elif fault == "rate_limited" and self.state.hit(self.request.path) <= RATE_LIMITED_FAILURES:
            self.text(429, "too many requests\n", Retry_After="1")
        elif fault == "drip":
            await self.send(item.data, item.content_type, self.state.settings.faults.drip_rate)
        elif fault == "truncated":
            await self.send(truncate(item.data, TRUNCATE_FRACTION), item.content_type)
        elif fault == "html":
            await self.send(_HTML_PAGE, "text/html; charset=utf-8")
        else:  # flaky/rate-limited URL past its failures
            await self.send(item.data, item.content_type)


class _TinyHandler(_Base):
    async def get(self, index: str) -> None:
        item = self.state.tiny[int(index) % len(self.state.tiny)]
        await self.send(item.data, item.content_type)


class _UrlsHandler(_Base):
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
                f"{base}{_url_path(self.state.images, kind, i)}\n"
                for i in range(start, min(count, start + 10_000))
            )
            if not await self._write(block.encode()):
                return
        self.finish()


class _StatusHandler(_Base):
    async def get(self, code: str) -> None:
        status = int(code)
        if not 200 <= status <= 599:
            self.text(400, "status must be within 200..599\n")
        elif status in (204, 304):
            self.set_status(status)
            self.finish()
        else:
            self.text(status, f"{status} {_reason(status)}\n")


class _FlakyHandler(_Base):
    async def get(self, _key: str, failures: str, code: str, index: str) -> None:
        status = int(code)
        if not 200 <= status <= 599:
            self.text(400, "status must be within 200..599\n")
            return
        if self.state.hit(self.request.path) <= int(failures):
            extra = {"Retry_After": "1"} if status in (429, 503) else {}
            self.text(status, f"{status} {_reason(status)} (flaky)\n", **extra)
            return
        item = self.state.images[int(index) % len(self.state.images)]
        await self.send(item.data, item.content_type)


class _DripHandler(_Base):
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


class _HangHandler(_Base):
    async def get(self) -> None:
        # Park until the client disconnects or the server stops; never answer.
        closed = asyncio.ensure_future(self.closed.wait())
        stopping = asyncio.ensure_future(self.state.stopping.wait())
        await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (closed, stopping):
            task.cancel()
        stream = self.detach()  # never send a response, just drop the connection
        stream.close()


class _TruncatedHandler(_Base):
    async def get(self, index: str) -> None:
        item = self.state.jpeg(int(index))
        await self.send(truncate(item.data, TRUNCATE_FRACTION), item.content_type)


class _ShortHandler(_Base):
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


class _HtmlHandler(_Base):
    async def get(self) -> None:
        await self.send(_HTML_PAGE, "text/html; charset=utf-8")


class _EmptyHandler(_Base):
    async def get(self) -> None:
        self.set_header("Content-Type", "image/jpeg")
        self.finish(b"")


class _MislabeledHandler(_Base):
    async def get(self, index: str) -> None:
        await self.send(self.state.jpeg(int(index)).data, "text/plain")


class _RedirectHandler(_Base):
    async def get(self, hops: str, index: str) -> None:
        n, i = int(hops), int(index)
        if n <= 0:
            item = self.state.images[i % len(self.state.images)]
            await self.send(item.data, item.content_type)
        elif n == 1:
            self.redirect(f"/img/{i}.jpg")
        else:
            self.redirect(f"/redirect/{n - 1}/{i}.jpg")


class _LoopHandler(_Base):
    async def get(self) -> None:
        self.redirect("/loop")


class _RedirectToHandler(_Base):
    async def get(self) -> None:
        target = self.get_argument("url", "")
        if not target or any(c in target for c in "\r\n"):
            self.text(400, "need a url parameter without CR/LF\n")
            return
        self.redirect(target)


class _BombHandler(_Base):
    async def get(self) -> None:
        await self.send(make_bomb_png(), "image/png")


class _HugeHandler(_Base):
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


class _CorruptHandler(_Base):
    async def get(self, index: str) -> None:
        await self.send(self.state.corrupted(int(index)), "image/jpeg")


class _FilesHandler(_Base):
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


class _AnyHandler(_Base):
    async def get(self) -> None:
        # The raw (still percent-encoded) path: no decoding, so any bytes are fine.
        path = self.request.path
        images = self.state.images
        item = images[int(_unit_hash(path) * len(images))]
        await self.send(item.data, item.content_type)


class _StatsHandler(_Base):
    async def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"requests": self.state.counts()}, sort_keys=True))


# --------------------------------------------------------------------- fake Imgur API

IMGUR_PAGES = 3  # default gallery length: pages 0..2 have items, page 3 is empty
IMGUR_PER_PAGE = 60
IMGUR_USER_LIMIT = 2000
IMGUR_CLIENT_LIMIT = 12500
IMGUR_ALBUM_SIZE = 3
_IMGUR_ALBUM_OFFSET = 1_000_000  # album image i of item g is /img/{offset + 10*g + i}
_IMGUR_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_IMGUR_INT_OPTIONS = ("pages", "per_page", "retry_after", "reset_in", "client_remaining")


def _imgur_id(text: str) -> str:
    n = int.from_bytes(hashlib.sha256(f"imgur-id:{text}".encode()).digest()[:8], "big")
    chars = []
    for _ in range(7):
        n, r = divmod(n, len(_IMGUR_ID_ALPHABET))
        chars.append(_IMGUR_ID_ALPHABET[r])
    return "".join(chars)


def _imgur_image(base: str, images: Sequence[CorpusItem], n: int, tag: str = "") -> dict:
    item = images[n % len(images)]
    return {
        "id": _imgur_id(f"{tag}{n}"),
        "title": f"demo image {n}",
        "description": None,
        "datetime": 1_700_000_000 + n,
        "type": item.content_type,
        "animated": item.frames > 1,
        "width": item.width,
        "height": item.height,
        "size": len(item.data),
        "views": 1000 + n,
        "link": f"{base}/img/{n}.{item.ext}",
        "is_album": False,
    }


def _imgur_item(base: str, images: Sequence[CorpusItem], g: int) -> dict:
    """Gallery item g; by g % 12: 3 album, 5 video, 7 repost of item g-1, 11 album
    without embedded images, else a single image (/img/{g}.{ext})."""
    kind = g % 12
    if kind in (3, 11):
        album_id = _imgur_id(f"album{g}")
        pictures = [
            _imgur_image(base, images, _IMGUR_ALBUM_OFFSET + 10 * g + k)
            for k in range(IMGUR_ALBUM_SIZE)
        ]
        album = {
            "id": album_id,
            "title": f"demo album {g}",
            "is_album": True,
            "link": f"{base}/imgur/a/{album_id}",
            "cover": pictures[0]["id"],
            "images_count": len(pictures),
        }
        return {**album, "images": pictures} if kind == 3 else album
    if kind == 5:
        video = f"{base}/imgur/v/{_imgur_id(f'video{g}')}.mp4"
        return {
            "id": _imgur_id(f"video{g}"),
            "title": f"demo video {g}",
            "type": "video/mp4",
            "animated": True,
            "has_sound": False,
            "link": video,
            "mp4": video,
            "is_album": False,
        }
    if kind == 7:
        return _imgur_image(base, images, g - 1, tag="repost")
    return _imgur_image(base, images, g)


def _imgur_options(text: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {"pages": IMGUR_PAGES, "per_page": IMGUR_PER_PAGE, "key": ""}
    strings = ("key", "client_id")
    for part in filter(None, (text or "").split(",")):
        name, sep, value = part.partition("=")
        if not sep or name not in (*_IMGUR_INT_OPTIONS, *strings):
            raise ValueError(
                f"bad option {part!r}: use NAME=VALUE, NAME in pages, per_page, "
                "key, client_id, retry_after, reset_in, client_remaining"
            )
        options[name] = value if name in strings else int(value)
    if not (0 <= options["pages"] <= 100_000 and 0 <= options["per_page"] <= 1000):
        raise ValueError("need pages in 0..100000 and per_page in 0..1000")
    return options


class _ImgurHandler(_Base):
    """``/imgur[/{options}]/3/gallery/{section}/{sort}/{window}/{page}``: Imgur-shaped JSON.

    Answers 401 without ``Authorization: Client-ID X``; 403 when the ``client_id``
    option is set and X differs.
    Options (comma-separated NAME=VALUE): ``pages``, ``per_page``; ``key`` names the
    state the next three use; ``retry_after=S``: the key's first request is a 429 with
    ``Retry-After: S``; ``reset_in=S``: the key's first answer reports a used-up user
    quota (``X-RateLimit-UserRemaining: 0``, reset in S s) and requests before the reset
    get a 429; ``client_remaining=N`` reports N (0: every request is a 429).
    """

    def initialize(self, state: _State, resets: dict[str, float]) -> None:  # type: ignore[override]
        super().initialize(state)
        self.resets = resets

    async def get(self, options: str | None, *path: str) -> None:
        try:
            opts = _imgur_options(options)
        except ValueError as exc:
            self.text(400, f"{exc}\n")
            return
        auth = self.request.headers.get("Authorization", "")
        scheme, _, client_id = auth.partition(" ")
        if scheme != "Client-ID" or not client_id.strip():
            error = {"error": "Authentication required", "request": self.request.path}
            self._json(401, {"data": error, "success": False, "status": 401})
            return
        if opts.get("client_id", client_id) != client_id:
            error = {"error": "Invalid client_id", "request": self.request.path}
            self._json(403, {"data": error, "success": False, "status": 403})
            return
        key = str(opts["key"])
        used = self.state.hit(f"imgur:{key}")
        now = time.time()
        if used == 1 and "reset_in" in opts:
            self.resets[key] = now + opts["reset_in"]
        reset_at = self.resets.get(key, 0.0)
        exhausted = reset_at > now
        client_left = opts.get("client_remaining", IMGUR_CLIENT_LIMIT - used)
        self.set_header("X-RateLimit-UserLimit", str(IMGUR_USER_LIMIT))
        self.set_header(
            "X-RateLimit-UserRemaining", "0" if exhausted else str(max(IMGUR_USER_LIMIT - used, 0))
        )
        self.set_header(
            "X-RateLimit-UserReset", str(math.ceil(reset_at if exhausted else now + 3600))
        )
        self.set_header("X-RateLimit-ClientLimit", str(IMGUR_CLIENT_LIMIT))
        self.set_header("X-RateLimit-ClientRemaining", str(max(client_left, 0)))
        too_many = {"data": {"error": "Too Many Requests"}, "success": False, "status": 429}
        if used == 1 and "retry_after" in opts:
            self.set_header("Retry-After", str(opts["retry_after"]))
            self._json(429, too_many)
        elif client_left <= 0 or (exhausted and used > 1):
            self._json(429, too_many)
        else:
            page = int(path[-1])
            base = f"{self.request.protocol}://{self.request.host}"
            items = []
            if page < opts["pages"]:
                first = page * opts["per_page"]
                items = [
                    _imgur_item(base, self.state.images, g)
                    for g in range(first, first + opts["per_page"])
                ]
            self._json(200, {"data": items, "success": True, "status": 200})

    def _json(self, status: int, body: dict) -> None:
        self.set_status(status, reason=_reason(status))
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body).encode())


class _NotFoundHandler(_Base):
    async def get(self, *_args: str) -> None:
        self.text(404, "no such route\n")


def _make_app(state: _State) -> Application:
    kw = {"state": state}
    routes = [
        (r"/img/(\d{1,18})\.(\w+)", _ImgHandler, kw),
        (r"/tiny/(\d{1,18})\.jpg", _TinyHandler, kw),
        (r"/urls", _UrlsHandler, kw),
        (r"/status/(\d{3})", _StatusHandler, kw),
        (r"/flaky/([^/]+)/(\d{1,9})/(\d{3})/(\d{1,18})\.jpg", _FlakyHandler, kw),
        (r"/drip/(\d{1,18})\.jpg", _DripHandler, kw),
        (r"/hang", _HangHandler, kw),
        (r"/truncated/(\d{1,18})\.jpg", _TruncatedHandler, kw),
        (r"/short/(\d{1,18})\.jpg", _ShortHandler, kw),
        (r"/html", _HtmlHandler, kw),
        (r"/empty", _EmptyHandler, kw),
        (r"/mislabeled/(\d{1,18})\.jpg", _MislabeledHandler, kw),
        (r"/redirect/(\d{1,4})/(\d{1,18})\.jpg", _RedirectHandler, kw),
        (r"/loop", _LoopHandler, kw),
        (r"/redirect-to", _RedirectToHandler, kw),
        (r"/bomb\.png", _BombHandler, kw),
        (r"/huge", _HugeHandler, kw),
        (r"/corrupt/(\d{1,18})\.jpg", _CorruptHandler, kw),
        (r"/any/.*", _AnyHandler, kw),
        (r"/files/(.*)", _FilesHandler, kw),
        (r"/stats", _StatsHandler, kw),
        (
            r"/imgur(?:/([\w=,.-]+))?/3/gallery/(\w+)/(\w+)/(\w+)/(\d{1,9})",
            _ImgurHandler,
            {**kw, "resets": {}},
        ),
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
        self._state: _State | None = None
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
        self._state = _State(self.settings)  # may generate the corpus (slow, once)
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
        """The first ``count`` URLs (same list as ``GET /urls``); kind: photos | tiny."""
        if kind not in URL_KINDS:
            raise ValueError(f"kind must be one of {tuple(URL_KINDS)}")
        if count < 0:
            raise ValueError("count must be >= 0")
        base, images = self.base_url, self._require_state().images
        return [f"{base}{_url_path(images, kind, i)}" for i in range(count)]

    def file_url(self, name: str) -> str:
        """The URL of ``/files/{name}`` (a file in ``settings.files_dir``)."""
        return f"{self.base_url}/files/{name}"

    def request_counts(self) -> dict[str, int]:
        """Requests received so far, keyed by path + query string."""
        return self._require_state().counts()

    def reset_counts(self) -> None:
        """Forget request counts and flaky/rate-limit state (faults start over)."""
        self._require_state().reset()

    def _require_state(self) -> _State:
        if self._state is None:
            raise RuntimeError("DemoServer was never started")
        return self._state


# --------------------------------------------------------------------------- CLI


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
        "--fault",
        type=_fraction_arg,
        action="append",
        default=[],
        metavar="NAME=FRACTION",
        help=f"fault fraction for /img/ URLs, NAME in {', '.join(FAULT_NAMES)}",
    )
    return parser


@contextlib.contextmanager
def server_process(
    latency: float, jitter: float = 0.02, *extra: str, start_timeout: float = 180.0
) -> Iterator[tuple[str, int]]:
    """``python -m imgtasks.demo_server`` as a process of its own, on a free port of
    127.0.0.1; yields its base URL and pid. For benchmarks, whose measured processes must
    not pay for the server's CPU. Stopped with Ctrl-C (then killed) on exit."""
    cmd = [sys.executable, "-m", "imgtasks.demo_server", "--port", "0"]
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
        )
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = DemoServer(settings)
    try:
        server.start()
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1
    logger.info(
        "serving %s  (try: GET %s/urls?count=%d)", server.base_url, server.base_url, args.count
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        server.stop()
    return 0


__all__ = [
    "DEFAULT_SETTINGS",
    "FAULT_NAMES",
    "NO_FAULTS",
    "DemoServer",
    "Faults",
    "ServerSettings",
    "main",
    "server_process",
]

if __name__ == "__main__":
    raise SystemExit(main())
