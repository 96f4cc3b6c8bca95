"""Crawling like a good citizen, per worker process: opt-out headers, robots.txt, a rate per
host, and DNS answers kept for a while. Plain Python, no dask; :mod:`imgtasks.download`
wires them into every request.

- ``X-Robots-Tag``: :func:`header_directives` reads the headers as the convention says
  (several headers, comma lists, ``agent: directives`` scopes, case-insensitive), and
  :func:`opt_out` names the first disallowed directive addressed to all agents or to us.
- robots.txt: :class:`RobotsCache` holds one parsed file per host (bounded, with a TTL),
  fetched by the caller's function; RFC 9309: a 4xx allows everything, a 5xx or an
  unreachable host disallows everything.
- :class:`RateLimiter`: at most ``rate`` requests a second to one host (a token bucket of
  one token, so requests are spaced ``1 / rate`` apart).
- :class:`DnsCache`: ``getaddrinfo`` once per host for a TTL; failures kept for less.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.robotparser
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

DEFAULT_TOKEN = "imgtasks"
# img2dataset's defaults: what site owners who opt out of AI training send.
DISALLOWED_DIRECTIVES: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
# Directives that take a value after a colon: "unavailable_after: 25 Jun 2030" is not an
# agent called "unavailable_after".
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)

V = TypeVar("V")


def header_directives(values: Iterable[str], token: str = DEFAULT_TOKEN) -> list[str]:
    """The ``X-Robots-Tag`` directives that apply to ``token``, in order.

    Each header is a comma list; ``name: directive`` starts a scope for agent ``name``
    that lasts to the end of that header (``otherbot: noindex, nofollow`` is two
    directives for otherbot). Unscoped directives apply to every agent.
    """
    token = token.lower()
    applying: list[str] = []
    for value in values:
        agent: str | None = None
        for item in value.split(","):
            name, colon, rest = item.strip().lower().partition(":")
            if colon and name.strip() not in _VALUED_DIRECTIVES:
                agent, item = name.strip(), rest
            directive = item.strip().lower()
            if directive and (agent is None or agent == token):
                applying.append(directive)
    return applying


def opt_out(
    values: Iterable[str],
    token: str = DEFAULT_TOKEN,
    disallowed: Iterable[str] = DISALLOWED_DIRECTIVES,
) -> str | None:
    """The first disallowed directive addressed to all agents or to ``token``, or None."""
    unwanted = {d.lower() for d in disallowed}
    return next((d for d in header_directives(values, token) if d in unwanted), None)


class _TtlCache(Generic[V]):
    """A thread-safe LRU of at most ``size`` entries, each kept for its own TTL."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            expires, value = found
            if time.monotonic() >= expires:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return value

    def put(self, key: str, value: V, ttl: float) -> None:
        with self._lock:
            self._items[key] = (time.monotonic() + ttl, value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def forget(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


# --- robots.txt ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RobotsAnswer:
    """What fetching a host's robots.txt gave: its text (2xx) or its failure."""

    status: int | None  # HTTP status; None: unreachable, timed out, too large
    text: str = ""


class RobotsCache:
    """One parsed robots.txt per host (``scheme://host:port``), fetched once per TTL.

    ``fetch(robots_url) -> RobotsAnswer`` does the request (with the caller's deadline,
    size cap and per-host limits). Concurrent first requests to one host wait for a
    single fetch.
    """

    TTL_S = 3600.0  # RFC 9309 allows caching up to 24 h; an hour follows changes sooner
    ERROR_TTL_S = 600.0  # a host that failed is asked again after 10 minutes
    SIZE = 10_000  # hosts kept (a parsed file is a few KB)

    def __init__(self, size: int = SIZE) -> None:
        self._parsers: _TtlCache[urllib.robotparser.RobotFileParser] = _TtlCache(size)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def allowed(
        self, origin: str, url: str, token: str, fetch: Callable[[str], RobotsAnswer]
    ) -> bool:
        parser = self._parsers.get(origin)
        if parser is None:
            with self._host_lock(origin):
                parser = self._parsers.get(origin)
                if parser is None:
                    answer = fetch(f"{origin}/robots.txt")
                    parser = robots_parser(answer)
                    ttl = self.TTL_S if answer.status and answer.status < 500 else self.ERROR_TTL_S
                    self._parsers.put(origin, parser, ttl)
        return parser.can_fetch(token, url)

    def _host_lock(self, origin: str) -> threading.Lock:
        with self._locks_lock:
            if len(self._locks) > 4 * self._parsers.size:  # bounded: drop idle locks
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            return self._locks.setdefault(origin, threading.Lock())


def robots_parser(answer: RobotsAnswer) -> urllib.robotparser.RobotFileParser:
    """RFC 9309: 2xx parsed; 4xx ("unavailable") allows everything; 5xx or no answer at all
    ("unreachable") disallows everything."""
    parser = urllib.robotparser.RobotFileParser()
    if answer.status is not None and 200 <= answer.status < 300:
        parser.parse(answer.text.splitlines())
    elif answer.status is not None and 400 <= answer.status < 500:
        parser.allow_all = True
    else:
        parser.disallow_all = True
    return parser


# --- rate per host ---------------------------------------------------------------------------


class RateLimiter:
    """At most ``rate`` requests a second to each host from this process."""

    def __init__(self, rate: float, hosts: int = 65_536) -> None:
        self.interval = 1.0 / rate
        self._next: _TtlCache[float] = _TtlCache(hosts)
        self._lock = threading.Lock()

    def delay(self, host: str) -> float:
        """Book the next slot of ``host``; returns how long to wait for it."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next.get(host) or now)
            self._next.put(host, slot + self.interval, ttl=self.interval + 60.0)
        return slot - now

    def wait(self, host: str) -> None:
        """Sleep until ``host`` may be asked again."""
        pause = self.delay(host)
        if pause > 0:
            time.sleep(pause)


# --- DNS ---------------------------------------------------------------------------------------


class DnsCache:
    """``getaddrinfo`` answers kept per (host, port): a list of a million URLs on a few
    thousand hosts makes a few thousand lookups, not a million."""

    TTL_S = 300.0  # we do not see the record's TTL; five minutes is a common one
    ERROR_TTL_S = 30.0  # a name that did not resolve is asked again soon, not every URL
    SIZE = 65_536

    def __init__(self, size: int = SIZE, resolve: Callable[..., list] | None = None) -> None:
        self._answers: _TtlCache[list | socket.gaierror] = _TtlCache(size)
        self._resolve = resolve

    def addresses(self, host: str, port: int) -> list[str]:
        """The addresses of ``host``, in the resolver's order; raises ``socket.gaierror``
        like a lookup."""
        key = f"{host}:{port}"
        answer = self._answers.get(key)
        if answer is None:
            answer = self._lookup(host, port)
            ttl = self.ERROR_TTL_S if isinstance(answer, socket.gaierror) else self.TTL_S
            self._answers.put(key, answer, ttl)
        if isinstance(answer, socket.gaierror):
            raise answer
        return list(dict.fromkeys(info[4][0] for info in answer))

    def forget(self, host: str, port: int) -> None:
        """After a failed connect: the next attempt asks the resolver again."""
        self._answers.forget(f"{host}:{port}")

    def _lookup(self, host: str, port: int) -> list | socket.gaierror:
        resolve = self._resolve or socket.getaddrinfo  # looked up late, so tests can count it
        try:
            return resolve(host, port, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            return exc
