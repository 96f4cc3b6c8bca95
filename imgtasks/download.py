"""Download image URLs over HTTP(S) with bounded time, size and per-host concurrency.

`fetch` downloads one URL and `fetch_many` a batch on a thread pool. Neither raises for
a per-URL problem: every outcome is a frozen `DownloadResult` whose `status` is one of
`STATUSES`:

=====================  ===============================================================
status                 meaning
=====================  ===============================================================
``ok``                 2xx response with a non-empty body, ``content`` holds the bytes
``invalid_url``        not http/https, no host, too long, whitespace/control characters,
                       unparsable; also a redirect to such a URL (no request is made)
``http_4xx``           final status 400-499 after retries (exact code in ``http_status``)
``http_5xx``           final status 500-599 after retries (exact code in ``http_status``)
``http_error``         any other non-2xx final status that is not a followable redirect
                       (1xx, 304, a 3xx without ``Location``, codes >= 600)
``timeout``            connect/read timeout, or the total per-URL ``deadline`` passed
``connection_error``   refused, reset, DNS failure, and any unexpected error
``too_large``          body larger than ``max_bytes`` (Content-Length or counted)
``too_many_redirects`` more than ``max_redirects`` redirects, or a redirect loop
``incomplete_body``    connection closed before Content-Length bytes arrived
``empty_body``         2xx response with no bytes
=====================  ===============================================================

HTTP-level retries (connect errors and the statuses 408/429/500/502/503/504, honouring
Retry-After up to ``retry_after_max``) are done by urllib3 inside one pooled
`requests.Session` per `DownloadSettings`; redirects are followed here so that every hop
is re-validated and counted against the deadline.

The deadline is checked before every hop and after every body chunk, and every socket
read is capped by the time left, so a slow or stalled body ends as ``timeout`` at the
deadline. Retries inside urllib3 (connect errors, retried statuses with their backoff
and Retry-After sleeps) are not interrupted and can overshoot it; a response that arrives
after the deadline is still reported as ``timeout``.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import itertools
import logging
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.util
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from imgtasks import __version__
from imgtasks.hostlimits import HostLimit, HostLimits, Ticket
from imgtasks.keyedpool import KeyedPool, Queued
from imgtasks.politeness import (
    DEFAULT_TOKEN,
    DISALLOWED_DIRECTIVES,
    DnsCache,
    RateLimiter,
    RobotsAnswer,
    RobotsCache,
    opt_out,
)
from imgtasks.stagecpu import counted
from imgtasks.status import DOWNLOAD, Status

logger = logging.getLogger(__name__)

STATUSES: tuple[Status, ...] = (Status.OK, *sorted(DOWNLOAD))

RETRY_STATUSES: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})
# Answers that say "too many of you": the host's adaptive limit shrinks (imgtasks.hostlimits).
OVERLOAD_STATUSES: frozenset[int] = frozenset({429, 503})
# Per-host limits. Adaptive (the default): a host starts at PER_HOST_START requests in
# flight and grows while it copes and the limit holds requests back, up to
# PER_HOST_CEILING (imgtasks.hostlimits). Issue 19: 1000 web-size images from one host
# answering in 500 ms took 34.7 s at a fixed 16 per host, 6.7 s at 256. On the seed task
# (1000 demo images, 100 ms, CPU-bound), with the measured window, against the fixed 16
# and a window of 16: +1 to +15 % CPU-s, median +4 %, in 6 interleaved pairs; wall time
# within the machine's noise (the host saw up to 128 at once, for nothing: the CPU pool
# is the bottleneck). Fixed (per_host_fixed, --per-host-fixed): PER_HOST_FIXED, the cap
# of earlier versions. The ceiling: the same 1000 images from one 500 ms host, 2
# interleaved runs each, (start, ceiling) = (8, 128) 7.97 / 7.89 s, (8, 256) 6.82 /
# 6.82 s, (16, 256) 6.35 / 6.44 s; img2dataset (2 x 32 threads) 12.3-13.2 s. The start
# stays 8: from 16, a host that copes with 4 at once sent 17-19 429s for 150 images
# instead of 11-12, one that copes with 12, 28 instead of 10.
PER_HOST_CEILING = 256
PER_HOST_START = 8
PER_HOST_FIXED = 16
# Hosts whose idle keep-alive connections one session keeps (urllib3's pool_connections;
# the least recently used host's are closed beyond it). It was `parallel` (16): 32 download
# nodes over 40 demo hosts opened ~1650 connections for 2000 requests and spent 5.3-5.5
# CPU-s (client and servers); with 256, ~110 connections and 3.5-3.7 CPU-s (plain HTTP:
# with TLS each new connection costs far more).
HOST_POOLS = 256
REDIRECT_STATUSES: frozenset[int] = frozenset({301, 302, 303, 307, 308})
ACCEPT = "image/*,*/*;q=0.8"
CHUNK_SIZE = 65536
# A socket read timeout of 0 would mean non-blocking; never go below this.
_MIN_SOCKET_TIMEOUT = 0.001
# A socket timeout set to the time left may fire a hair before the deadline.
_DEADLINE_SLACK = 0.05


DEFAULT_USER_AGENT = f"imgtasks/{__version__} (+https://github.com/imgtasks/imgtasks)"


def _is_bad_char(char: str) -> bool:
    return char.isspace() or ord(char) < 32 or ord(char) == 127


# The same test as _is_bad_char over a whole URL (checked on every code point; re's \s is
# str.isspace), ~1 us instead of ~10 for a 78-character URL: the client checks every URL.
_BAD_URL_CHAR = re.compile(r"[\s\x00-\x1f\x7f]")
# Most URLs are plain http(s)://host/...: no user, port or IPv6 address, where urlsplit
# finds nothing wrong. Telling them apart costs ~0.5 us; urlsplit ~3 us, most of the
# client's check of each URL.
_PLAIN_URL = re.compile(r"https?://[a-z0-9.-]+(?:[/?#]|\Z)", re.IGNORECASE)


@dataclass(frozen=True)
class DownloadSettings:
    """How to download; frozen and hashable so it can key the session cache."""

    connect_timeout: float = 10.0
    read_timeout: float = 20.0
    deadline: float = 30.0  # total wall clock per URL: retries, redirects and body
    max_bytes: int = 50 * 2**20
    retries: int = 3
    backoff: float = 0.5  # urllib3 exponential backoff factor
    backoff_jitter: float = 0.25
    retry_after_max: int = 10  # seconds; longer Retry-After values are capped
    max_redirects: int = 5
    user_agent: str = DEFAULT_USER_AGENT
    # Concurrent requests to one host from this process: the adaptive limit's ceiling
    # (None: PER_HOST_CEILING), or with per_host_fixed the fixed cap (None: PER_HOST_FIXED).
    per_host: int | None = None
    per_host_start: int = PER_HOST_START  # the adaptive limit's first value
    per_host_fixed: bool = False  # a fixed cap instead of the adaptive limit
    # Threads one fetch_many call uses at most: a batch's URLs go out at once (batches
    # grow to window.BATCH_CEILING), the hosts' limits deciding how many reach each host.
    parallel: int = 128
    max_url_length: int = 2048
    # Politeness (imgtasks.politeness). The token is matched in X-Robots-Tag and robots.txt
    # and sent in the User-Agent; an empty directive tuple turns the opt-out check off.
    user_agent_token: str = DEFAULT_TOKEN
    disallowed_header_directives: tuple[str, ...] = DISALLOWED_DIRECTIVES
    respect_robots_txt: bool = False
    per_host_rate: float | None = None  # requests per second to one host; None: no limit
    dns_cache: bool = True  # resolve each host once per TTL in this process

    def __post_init__(self) -> None:
        # JSON/CLI give lists; a tuple keeps the settings hashable (they key the sessions).
        directives = tuple(d.strip().lower() for d in self.disallowed_header_directives)
        object.__setattr__(self, "disallowed_header_directives", tuple(d for d in directives if d))
        if self.per_host is None:
            cap = PER_HOST_FIXED if self.per_host_fixed else PER_HOST_CEILING
            object.__setattr__(self, "per_host", cap)
        positive = {
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "deadline": self.deadline,
            "max_bytes": self.max_bytes,
            "per_host": self.per_host,
            "per_host_start": self.per_host_start,
            "parallel": self.parallel,
            "max_url_length": self.max_url_length,
        }
        if self.per_host_rate is not None:
            positive["per_host_rate"] = self.per_host_rate
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"DownloadSettings.{name} must be > 0, got {value!r}")
        non_negative = {
            "retries": self.retries,
            "backoff": self.backoff,
            "backoff_jitter": self.backoff_jitter,
            "retry_after_max": self.retry_after_max,
            "max_redirects": self.max_redirects,
        }
        for name, value in non_negative.items():
            if not value >= 0:
                raise ValueError(f"DownloadSettings.{name} must be >= 0, got {value!r}")
        self._check_types()

    def _check_types(self) -> None:
        integers = ("max_bytes", "retries", "max_redirects", "per_host", "parallel")
        for name in (*integers, "per_host_start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"DownloadSettings.{name} must be an int, got {value!r}")
        if not isinstance(self.user_agent, str) or not self.user_agent.strip():
            raise ValueError("DownloadSettings.user_agent must be a non-empty string")
        if any(_is_bad_char(c) and c != " " for c in self.user_agent):
            raise ValueError("DownloadSettings.user_agent must not contain control characters")
        token = self.user_agent_token
        if (
            not isinstance(token, str)
            or not token
            or not all(c.isalnum() or c in "-_" for c in token)
        ):
            raise ValueError(
                f"DownloadSettings.user_agent_token must be letters, digits, - or _; got {token!r}"
            )

    @property
    def user_agent_header(self) -> str:
        """The User-Agent sent: ``user_agent``, with the token added when it lacks it."""
        if self.user_agent_token.lower() in self.user_agent.lower():
            return self.user_agent
        return f"{self.user_agent} {self.user_agent_token}"


DEFAULT_DOWNLOAD = DownloadSettings()


@dataclass(frozen=True)
class DownloadResult:
    """Outcome of downloading one URL; `content` is None unless `ok`."""

    url: str
    status: Status
    http_status: int | None
    content: bytes | None
    elapsed_s: float  # wall clock of the whole fetch, waits for a per-host slot included
    error: str
    final_url: str
    content_type: str
    attempts: int
    queued_s: float = 0.0  # of elapsed_s, waiting for a per-host slot (not the network)

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    @property
    def network_s(self) -> float:
        """Time spent on requests and bodies: elapsed minus waits for a host slot."""
        return max(0.0, self.elapsed_s - self.queued_s)


# --------------------------------------------------------------------------- URLs


def validate_url(url: str, max_length: int) -> str | None:
    """Return why `url` cannot be downloaded, or None if it looks fine. Pure, no I/O."""
    if not isinstance(url, str):
        return f"URL must be a string, got {type(url).__name__}"
    if not url:
        return "empty URL"
    if len(url) > max_length:
        return f"URL longer than {max_length} characters ({len(url)})"
    if _BAD_URL_CHAR.search(url):
        return "URL contains whitespace or control characters"
    if _PLAIN_URL.match(url):
        return None
    return _parsed_problem(url)


def _parsed_problem(url: str) -> str | None:
    """What urlsplit finds wrong with a URL without whitespace or control characters."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"unparsable URL: {exc}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"unsupported URL scheme {parts.scheme!r} (only http and https)"
    if not host:
        return "URL has no host"
    if parts.port == 0:
        return "URL has port 0"
    return None


def _host_key(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


# --------------------------------------------------------------------- shared state

_sessions: dict[DownloadSettings, requests.Session] = {}
_sessions_lock = threading.Lock()
# One set of per-host limits per (ceiling, start, fixed): settings that differ do not share.
_host_limits: dict[tuple[int, int, bool], HostLimits] = {}
# Per worker process, like the sessions: one cache of robots.txt files, of DNS answers, and
# one rate limiter per rate.
_robots = RobotsCache()
_dns = DnsCache()
_rate_limiters: dict[float, RateLimiter] = {}
ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309: parse at least the first 500 KiB


class _CachedDnsConnection:
    """Connects to the host's addresses from ``_dns`` (each in turn, as the resolver gave
    them) instead of resolving on every new connection; the Host header, SNI and the
    certificate check still use the name."""

    def _new_conn(self) -> socket.socket:
        name, port = self._dns_host, self.port  # type: ignore[attr-defined]
        try:
            addresses = _dns.addresses(name, port)
        except socket.gaierror as exc:
            raise urllib3.exceptions.NameResolutionError(name, self, exc) from exc  # type: ignore[arg-type]
        try:
            for address in addresses[:-1]:
                self._dns_host = address
                with suppress(urllib3.exceptions.NewConnectionError):
                    return super()._new_conn()  # type: ignore[misc]
            self._dns_host = addresses[-1]
            return super()._new_conn()  # type: ignore[misc]
        except urllib3.exceptions.NewConnectionError:
            _dns.forget(name, port)  # the host may have moved: ask the resolver next time
            raise
        finally:
            self._dns_host = name


class _HTTPConnection(_CachedDnsConnection, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_CachedDnsConnection, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_CACHED_DNS_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _NoCookies(http.cookiejar.CookiePolicy):
    """Image URLs are independent: never store or send cookies (also avoids jar races)."""

    netscape = True
    rfc2965 = False
    hide_cookie2 = False

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False

    def domain_return_ok(self, domain: str, request: object) -> bool:
        return False

    def path_return_ok(self, path: str, request: object) -> bool:
        return False


class _PoliteRetry(Retry):
    """urllib3's retries, each waiting like a first attempt: the host's slot is given back
    during the backoff or Retry-After sleep and taken again after it (under the limit as
    it is then: a retry of a 429 must not bring back the load that caused it), then the
    host's rate slot: the rate holds for every request, not only first attempts."""

    def sleep(self, response: object = None) -> None:
        _overloaded(response, self)  # tell the host's limit before waiting, not after
        with _slot_given_back():
            super().sleep(response)  # type: ignore[arg-type]
        booked = getattr(_this_request, "rate", None)
        if booked is not None:
            limiter, host = booked
            limiter.wait(host)


# The host of the request this thread is making, for _PoliteRetry (urllib3 retries inside
# one session.get call, in the calling thread).
_this_request = threading.local()


def _retry_policy(settings: DownloadSettings) -> Retry:
    return _PoliteRetry(
        total=None,  # the per-kind limits below are the real ones
        connect=settings.retries,
        read=0,  # a read error may have consumed a partial body: do not replay
        status=settings.retries,
        other=0,
        redirect=False,  # redirects are followed (and re-validated) by fetch itself
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
        backoff_factor=settings.backoff,
        backoff_jitter=settings.backoff_jitter,
        respect_retry_after_header=True,
        retry_after_max=settings.retry_after_max,
        raise_on_status=False,
        raise_on_redirect=False,
    )


def _new_session(settings: DownloadSettings) -> requests.Session:
    session = requests.Session()
    session.headers.update({"User-Agent": settings.user_agent_header, "Accept": ACCEPT})
    session.cookies.set_policy(_NoCookies())
    adapter = HTTPAdapter(
        pool_connections=HOST_POOLS,
        pool_maxsize=settings.per_host,
        max_retries=_retry_policy(settings),
    )
    if settings.dns_cache:
        adapter.poolmanager.pool_classes_by_scheme = _CACHED_DNS_POOLS
    session.adapters.clear()  # only http(s): nothing else may be mounted by default
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    _read_environment_once(session)
    return session


def _read_environment_once(session: requests.Session) -> None:
    """requests re-reads the whole environment on every request (proxies, no_proxy, netrc,
    CA bundle): ~0.4 ms of a ~1.4 ms fetch, measured serially on the demo server. Without
    proxy variables nothing there changes per URL, so read the CA bundle once and stop the
    lookups (this also means ~/.netrc credentials are never sent to image hosts). With
    proxy variables requests keeps resolving them per URL, no_proxy rules included."""
    if any(scheme != "no" for scheme in urllib.request.getproxies()):
        return
    session.trust_env = False
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    session.verify = bundle or True


def get_session(settings: DownloadSettings = DEFAULT_DOWNLOAD) -> requests.Session:
    """The process-wide pooled session for `settings` (created once, thread-safe)."""
    session = _sessions.get(settings)
    if session is None:
        with _sessions_lock:
            session = _sessions.get(settings)
            if session is None:
                session = _sessions[settings] = _new_session(settings)
    return session


def host_limits(settings: DownloadSettings = DEFAULT_DOWNLOAD) -> HostLimits:
    """This process's per-host limits under ``settings`` (keyed by scheme, host, port)."""
    assert settings.per_host is not None  # resolved by DownloadSettings
    key = (settings.per_host, settings.per_host_start, settings.per_host_fixed)
    limits = _host_limits.get(key)
    if limits is None:
        with _sessions_lock:
            limits = _host_limits.setdefault(
                key,
                HostLimits(
                    settings.per_host,
                    settings.per_host_start,
                    adaptive=not settings.per_host_fixed,
                ),
            )
    return limits


class _Failure(Exception):
    """Internal: ends a fetch with a non-ok status."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@contextmanager
def _host_slot(url: str, settings: DownloadSettings, timeout: float) -> Iterator[None]:
    """Hold one of the host's slots. Inside, ``_this_request.slot`` is the host's limit
    and this request's ticket: time-outs and resets raised here shrink the limit, and
    ``_answered`` / ``_overloaded`` report the answers."""
    limit = host_limits(settings).get(_host_key(url))
    _this_request.deadline_at = time.monotonic() + timeout
    _this_request.slot = _take_slot(limit)
    try:
        yield
    except Exception as exc:
        status = exc.status if isinstance(exc, _Failure) else _classify(exc)
        held = _slot()
        if held is not None and status in (Status.TIMEOUT, Status.CONNECTION_ERROR):
            limit.overloaded(held[1])
        raise
    finally:
        held = _slot()
        _this_request.slot = None
        if held is not None:
            limit.release(held[1])


def _take_slot(limit: HostLimit) -> tuple[HostLimit, Ticket]:
    priority = getattr(_this_request, "priority", ())
    ticket = limit.acquire(_this_request.deadline_at - time.monotonic(), priority)
    if ticket is None:
        raise _Failure(Status.TIMEOUT, "deadline passed while waiting for a per-host slot")
    return limit, ticket


@contextmanager
def _slot_given_back() -> Iterator[None]:
    """Inside, this thread holds no slot of its host; after, it holds one again (or the
    deadline passed: ``_Failure``, which urllib3 and requests let through)."""
    held = _slot()
    if held is None:
        yield
        return
    limit, ticket = held
    _this_request.slot = None
    limit.release(ticket)
    yield
    _this_request.slot = _take_slot(limit)


def _slot() -> tuple[HostLimit, Ticket] | None:
    return getattr(_this_request, "slot", None)


def _answered(resp: _Response, latency_s: float) -> None:
    """Tell the host's limit how its answer went: an overload, or healthy with its time to
    first byte (not measured when urllib3 retried: its waits are not the host's pace)."""
    held = _slot()
    if held is None:
        return
    limit, ticket = held
    if resp.status_code in OVERLOAD_STATUSES:
        _overloaded(resp.raw, None)
    elif not _retries_used(resp):
        limit.answered(ticket, latency_s)


def _overloaded(response: Any, retry: Retry | None) -> None:
    """A 429/503 (its Retry-After pauses the host), or a retried connect error."""
    held = _slot()
    if held is None:
        return
    limit, ticket = held
    status = getattr(response, "status", None)
    if response is not None and status not in OVERLOAD_STATUSES:
        return  # 500, 502, 504, 408: the host is failing, not asking us to slow down
    pause = (retry or Retry(0)).get_retry_after(response) if response is not None else None
    cap = getattr(retry, "retry_after_max", None)
    limit.overloaded(ticket, pause if pause is None or cap is None else min(pause, cap))


# -------------------------------------------------------------------------- fetching


@dataclass
class _Progress:
    """Mutable per-fetch state, so a failure can still report what happened so far."""

    url: str
    settings: DownloadSettings
    started: float = field(default_factory=time.monotonic)
    current_url: str = ""
    attempts: int = 0
    queued: float = 0.0  # seconds spent waiting for per-host slots
    http_status: int | None = None
    content_type: str = ""

    def remaining(self) -> float:
        return self.settings.deadline - (time.monotonic() - self.started)

    def deadline_message(self, what: str) -> str:
        return f"deadline of {self.settings.deadline:g}s passed {what}"

    def check_deadline(self, what: str) -> float:
        remaining = self.remaining()
        if remaining <= 0:
            raise _Failure(Status.TIMEOUT, self.deadline_message(what))
        return remaining

    def result(
        self, status: Status, error: str = "", content: bytes | None = None
    ) -> DownloadResult:
        return DownloadResult(
            url=self.url,
            status=status,
            http_status=self.http_status,
            content=content if status == Status.OK else None,
            elapsed_s=time.monotonic() - self.started,
            error=error,
            final_url=self.current_url or self.url,
            content_type=self.content_type,
            attempts=self.attempts,
            queued_s=self.queued,
        )


def fetch(url: str, settings: DownloadSettings = DEFAULT_DOWNLOAD) -> DownloadResult:
    """Download one URL. Never raises for a per-URL problem: see the module docstring."""
    return _fetch(url, settings, 0.0)


def _fetch(url: str, settings: DownloadSettings, waited: float) -> DownloadResult:
    """``fetch``, after ``waited`` seconds in the queue for the host's slot: they count
    towards the deadline, as queued time."""
    progress = _Progress(url, settings, time.monotonic() - waited, url, queued=waited)
    try:
        content = _follow(progress)
    except _Failure as failure:
        return progress.result(failure.status, failure.message)
    except Exception as exc:  # the boundary: any surprise becomes a status
        status = _classify(exc)
        progress.attempts += _retries_before_error(exc, settings)
        logger.debug("fetch %s failed: %s: %r", url, status, exc)
        return progress.result(status, _describe(exc))
    return progress.result(Status.OK, content=content)


def _follow(progress: _Progress) -> bytes:
    """Request the URL, following up to max_redirects redirects; return the body."""
    settings = progress.settings
    seen = {progress.url}
    for _hop in range(settings.max_redirects + 1):
        error = validate_url(progress.current_url, settings.max_url_length)
        if error is not None:
            raise _Failure(Status.INVALID_URL, _redirect_context(progress, error))
        outcome = _request(progress)
        if isinstance(outcome, bytes):
            return outcome
        if outcome in seen:
            raise _Failure(Status.TOO_MANY_REDIRECTS, f"redirect loop back to {outcome}")
        seen.add(outcome)
        progress.current_url = outcome
    raise _Failure(Status.TOO_MANY_REDIRECTS, f"more than {settings.max_redirects} redirects")


def _redirect_context(progress: _Progress, error: str) -> str:
    if progress.current_url == progress.url:
        return error
    return f"redirect to {progress.current_url!r}: {error}"


def _request(progress: _Progress) -> bytes | str:
    """One hop: return the body, or the absolute URL a redirect points to."""
    settings = progress.settings
    url = progress.current_url
    if settings.respect_robots_txt:
        _check_robots(progress, url)
    with _polite_slot(progress, url, "the request") as remaining:
        progress.attempts += 1  # corrected below from urllib3's retry history
        asked = time.monotonic()
        with _get_image(settings, url, remaining) as resp:
            _answered(resp, time.monotonic() - asked)
            return _handle_response(progress, resp)


def _get(settings: DownloadSettings, url: str, remaining: float) -> requests.Response:
    """A streamed GET, redirects followed, whose connect and read time-outs fit in the
    time left (robots.txt)."""
    return get_session(settings).get(url, stream=True, timeout=_timeouts(settings, remaining))


def _timeouts(settings: DownloadSettings, remaining: float) -> tuple[float, float]:
    """(connect, read) time-outs that fit in the ``remaining`` seconds."""
    return min(settings.connect_timeout, remaining), min(settings.read_timeout, remaining)


def _get_image(settings: DownloadSettings, url: str, remaining: float) -> _Response:
    """One hop of an image request, streamed, redirects not followed: the session's own
    urllib3 pool (its retries, TLS settings and headers) called the way requests' adapter
    calls it, without requests' per-request work around it (preparing the request, the
    cookie jar on the way out and in, building the Response). Measured on the demo's
    web-size images (~33 KiB), one thread, 600 requests x 5: 1.11-1.21 ms CPU per request
    instead of 1.69 (a package build beside it); in the flow (``cpu_breakdown.py``, 3
    interleaved pairs) ``fetch`` took 0.67-0.96 ms per image instead of 1.10-1.28. With
    proxy variables in the environment the request goes through requests as a whole, which
    resolves them per URL (no_proxy rules included)."""
    session = get_session(settings)
    connect, read = _timeouts(settings, remaining)
    if session.trust_env:
        return session.get(url, stream=True, timeout=(connect, read), allow_redirects=False)
    parsed = urllib3.util.parse_url(url)  # as requests does: IDNA host, invalid chars quoted
    adapter = session.get_adapter(url)
    assert isinstance(adapter, HTTPAdapter)
    pool = _pool_for(session, adapter, parsed.url)
    raw = pool.urlopen(
        "GET",
        parsed.request_uri,
        headers=session.headers,
        redirect=False,
        assert_same_host=False,
        preload_content=False,
        decode_content=False,
        retries=adapter.max_retries,
        timeout=urllib3.Timeout(connect=connect, read=read),
    )
    return _Answer(raw)


def _pool_for(
    session: requests.Session, adapter: HTTPAdapter, url: str
) -> urllib3.connectionpool.HTTPConnectionPool:
    """The session's connection pool for the URL's host, with the TLS settings requests
    would give it (``get_connection_with_tls_context``, then ``cert_verify``)."""
    request = requests.PreparedRequest()
    request.url = url
    host, tls = adapter.build_connection_pool_key_attributes(request, session.verify, session.cert)
    pool = adapter.poolmanager.connection_from_host(**host, pool_kwargs=tls)
    adapter.cert_verify(pool, url, session.verify, session.cert)
    return pool


class _Answer:
    """What the fetch reads of a ``requests.Response`` (``status_code``, ``reason``,
    ``headers``, ``raw``), over urllib3's response; closed as requests closes a streamed
    response: a body not read to its end drops its connection, the rest go back to the
    pool."""

    __slots__ = ("raw",)

    def __init__(self, raw: urllib3.BaseHTTPResponse) -> None:
        self.raw = raw

    @property
    def status_code(self) -> int:
        return self.raw.status

    @property
    def reason(self) -> str | None:
        return self.raw.reason

    @property
    def headers(self) -> urllib3.HTTPHeaderDict:
        return self.raw.headers

    def __enter__(self) -> _Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.close()
        self.raw.release_conn()


_Response = requests.Response | _Answer  # an answer, through requests or straight from urllib3


@contextmanager
def _polite_slot(progress: _Progress, url: str, what: str) -> Iterator[float]:
    """Hold a per-host slot and the host's rate slot; yields the seconds left. Waiting
    for either counts as queued, not network, time."""
    settings = progress.settings
    asked = time.monotonic()
    with _host_slot(url, settings, progress.check_deadline(f"before {what}")):
        limiter = _rate_limiter(settings)
        host = _origin(url)
        if limiter is not None:
            pause = limiter.delay(host)
            if pause >= progress.remaining():
                raise _Failure(Status.TIMEOUT, f"deadline passed while waiting for {host}'s rate")
            time.sleep(max(pause, 0.0))
        progress.queued += time.monotonic() - asked
        remaining = progress.check_deadline("while waiting for a per-host slot")
        _this_request.rate = None if limiter is None else (limiter, host)
        try:
            yield remaining
        finally:
            _this_request.rate = None


def _rate_limiter(settings: DownloadSettings) -> RateLimiter | None:
    rate = settings.per_host_rate
    if rate is None:
        return None
    limiter = _rate_limiters.get(rate)
    if limiter is None:
        with _sessions_lock:
            limiter = _rate_limiters.setdefault(rate, RateLimiter(rate))
    return limiter


def _origin(url: str) -> str:
    scheme, host, port = _host_key(url)
    return f"{scheme}://{host}:{port}"


def _check_robots(progress: _Progress, url: str) -> None:
    origin = _origin(url)
    token = progress.settings.user_agent_token
    if not _robots.allowed(origin, url, token, lambda robots: _fetch_robots(progress, robots)):
        raise _Failure(Status.ROBOTS_DISALLOWED, f"{origin}/robots.txt disallows {token}")


def _fetch_robots(progress: _Progress, robots_url: str) -> RobotsAnswer:
    """A host's robots.txt under the same deadline, per-host and rate limits as images."""
    settings = progress.settings
    try:
        with (
            _polite_slot(progress, robots_url, "fetching robots.txt") as remaining,
            _get(settings, robots_url, remaining) as resp,
        ):
            # the images' size cap holds here too (RFC 9309 asks for at least 500 KiB)
            cap = min(ROBOTS_MAX_BYTES, settings.max_bytes)
            text = resp.raw.read(cap, decode_content=True)
            return RobotsAnswer(resp.status_code, text.decode("utf-8", "replace"))
    except Exception as exc:  # unreachable, timed out: RFC 9309 says disallow
        logger.debug("robots.txt %s unreachable: %r", robots_url, exc)
        return RobotsAnswer(None)


def _handle_response(progress: _Progress, resp: _Response) -> bytes | str:
    progress.attempts += _retries_used(resp)
    progress.http_status = resp.status_code
    progress.content_type = resp.headers.get("Content-Type", "")
    code = resp.status_code
    if code in REDIRECT_STATUSES and resp.headers.get("Location"):
        return _resolve_location(progress.current_url, resp.headers["Location"])
    if not 200 <= code < 300:
        raise _Failure(_http_status_kind(code), f"HTTP {code} {resp.reason or ''}".rstrip())
    _check_opt_out(progress.settings, resp)
    return _read_body(progress, resp)


def _check_opt_out(settings: DownloadSettings, resp: _Response) -> None:
    """Nothing is kept of a response whose X-Robots-Tag opts out (checked before the body
    is read). The headers one by one: requests joins repeated headers with commas, which
    would merge one header's agent scope into the next."""
    if not settings.disallowed_header_directives:
        return
    headers = resp.raw.headers.getlist("X-Robots-Tag") if resp.raw is not None else []
    directive = opt_out(headers, settings.user_agent_token, settings.disallowed_header_directives)
    if directive is not None:
        raise _Failure(Status.OPTED_OUT, f"X-Robots-Tag: {directive}")


def _resolve_location(base: str, location: str) -> str:
    # urljoin("http://a/b", "http://") yields "http://a/b": an absolute Location (one
    # with a scheme) is taken verbatim so that validation sees what the server sent.
    try:
        absolute = bool(urlsplit(location).scheme)
    except ValueError:
        absolute = True
    return location if absolute else urljoin(base, location)


def _retries_used(resp: _Response) -> int:
    retries = getattr(resp.raw, "retries", None)
    history = getattr(retries, "history", None)
    return len(history) if history else 0


def _http_status_kind(code: int) -> Status:
    if 400 <= code < 500:
        return Status.HTTP_4XX
    if 500 <= code < 600:
        return Status.HTTP_5XX
    return Status.HTTP_ERROR


def _declared_length(resp: _Response) -> int | None:
    # With a content-encoding the header counts compressed bytes, not what we count.
    if resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity"):
        return None
    value = resp.headers.get("Content-Length", "")
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


def _read_body(progress: _Progress, resp: _Response) -> bytes:
    settings = progress.settings
    raw_length = resp.headers.get("Content-Length", "")
    if raw_length.isdigit() and int(raw_length) > settings.max_bytes:
        raise _Failure(
            Status.TOO_LARGE, f"Content-Length {raw_length} > max_bytes {settings.max_bytes}"
        )
    declared = _declared_length(resp)
    try:
        body = _read_chunks(progress, resp)
    except urllib3.exceptions.ProtocolError as exc:
        # Early close with a promised length (or a cut chunked body) is incomplete_body;
        # a reset of a body of unknown length is left to the boundary: connection_error.
        if declared is None and _classify(exc) != "incomplete_body":
            raise
        message = f"connection closed early while reading body: {exc}"
        raise _Failure(Status.INCOMPLETE_BODY, message) from exc
    if declared is not None and len(body) < declared:
        raise _Failure(Status.INCOMPLETE_BODY, f"got {len(body)} of {declared} bytes")
    if not body:
        raise _Failure(Status.EMPTY_BODY, f"HTTP {resp.status_code} with an empty body")
    return body


def _read_chunks(progress: _Progress, resp: _Response) -> bytes:
    """Read the (decoded) body in chunks, enforcing max_bytes and the deadline."""
    settings = progress.settings
    raw = resp.raw
    chunks: list[bytes] = []
    total = 0
    while True:
        remaining = progress.check_deadline("while reading the body")
        # Cap every socket read by the time left, so a stalled body cannot overshoot.
        _set_read_timeout(raw, min(settings.read_timeout, remaining))
        try:
            chunk = raw.read1(CHUNK_SIZE, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as exc:
            # The read was cut by the deadline rather than by read_timeout: say so.
            if progress.remaining() < _DEADLINE_SLACK:
                message = progress.deadline_message("while reading the body")
                raise _Failure(Status.TIMEOUT, message) from exc
            raise
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > settings.max_bytes:
            raise _Failure(Status.TOO_LARGE, f"body exceeded max_bytes {settings.max_bytes}")
        chunks.append(chunk)


def _set_read_timeout(raw: object, timeout: float) -> None:
    # Best effort: urllib3 exposes the connection (and its socket) of a streamed response.
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is not None:
        with suppress(OSError):
            sock.settimeout(max(timeout, _MIN_SOCKET_TIMEOUT))


# ------------------------------------------------------------------ error mapping

_INVALID_URL_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    urllib3.exceptions.LocationValueError,  # LocationParseError included
    UnicodeError,
)
_TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.Timeout,
    urllib3.exceptions.TimeoutError,
    TimeoutError,  # socket.timeout is an alias since Python 3.10
)
_INCOMPLETE_ERRORS: tuple[type[BaseException], ...] = (
    http.client.IncompleteRead,
    urllib3.exceptions.IncompleteRead,
)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps: requests and urllib3 nest the real cause in args/reason."""
    found: list[BaseException] = []
    pending: list[object] = [exc]
    while pending and len(found) < 20:
        item = pending.pop()
        if not isinstance(item, BaseException) or any(item is f for f in found):
            continue
        found.append(item)
        pending.extend([item.__cause__, item.__context__, getattr(item, "reason", None)])
        pending.extend(item.args)
    return found


def _classify(exc: BaseException) -> Status:
    chain = _exception_chain(exc)

    def has(types: tuple[type[BaseException], ...]) -> bool:
        return any(isinstance(e, types) for e in chain)

    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2: a refused
    # connection or DNS failure is not a timeout.
    if has((urllib3.exceptions.NewConnectionError,)) and not has((TimeoutError,)):
        return Status.CONNECTION_ERROR
    if has(_TIMEOUT_ERRORS):
        return Status.TIMEOUT
    if has(_INCOMPLETE_ERRORS):
        return Status.INCOMPLETE_BODY
    if has(_INVALID_URL_ERRORS):
        return Status.INVALID_URL
    return Status.CONNECTION_ERROR


def _retries_before_error(exc: BaseException, settings: DownloadSettings) -> int:
    """Best-effort retry count when urllib3 gave up: only connect errors are retried."""
    chain = _exception_chain(exc)
    exhausted = any(isinstance(e, urllib3.exceptions.MaxRetryError) for e in chain)
    connect = any(
        isinstance(
            e, (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.NewConnectionError)
        )
        for e in chain
    )
    return settings.retries if exhausted and connect else 0


def _describe(exc: BaseException) -> str:
    # MaxRetryError's text is mostly pool boilerplate: report what it was caused by.
    for item in _exception_chain(exc):
        if isinstance(item, urllib3.exceptions.MaxRetryError) and item.reason is not None:
            exc = item.reason
            break
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"


# ------------------------------------------------------------------------- batches


def fetch_many(
    urls: Sequence[str], settings: DownloadSettings = DEFAULT_DOWNLOAD
) -> list[DownloadResult]:
    """Download `urls` concurrently (up to `settings.parallel` at once), in input order."""
    if not urls:
        return []
    pool = _download_pool()
    batch = next(_batch_order)
    results: list[DownloadResult | None] = [None] * len(urls)
    pending = iter(enumerate(urls))
    running: dict[Future[DownloadResult], Queued] = {}
    places: dict[Future[DownloadResult], int] = {}

    def submit_next() -> None:
        for index, url in pending:
            entry = _submit(pool, url, settings, (batch, index))
            running[entry.future], places[entry.future] = entry, index
            return

    try:
        for _ in range(settings.parallel):  # at most `parallel` of this call's URLs at once
            submit_next()
        next_deadline = time.monotonic() + settings.deadline
        while running:
            left = max(next_deadline - time.monotonic(), 0.0)
            done, _ = wait(running, timeout=left, return_when=FIRST_COMPLETED)
            for future in done:
                del running[future]
                results[places.pop(future)] = future.result()
                submit_next()
            now = time.monotonic()
            if now >= next_deadline:  # URLs that waited for their host too long
                # (a URL queued from now on cannot expire before now + deadline)
                next_deadline = min(pool.expire(list(running.values())), now + settings.deadline)
    finally:  # interrupted: what has not started yet never will
        for future in running:
            future.cancel()
    return [r for r in results if r is not None]


def _submit(
    pool: KeyedPool, url: str, settings: DownloadSettings, priority: tuple[int, ...]
) -> Queued:
    """Queue one fetch behind its host's limit: it gets a thread once the host has a slot."""
    try:
        limit: HostLimit | None = host_limits(settings).get(_host_key(url))
    except ValueError:  # an unparsable port: fetch reports it, no request is made
        limit = None
    allowed = (lambda: _POOL_THREADS) if limit is None else (lambda: limit.allowed)

    def expired(waited: float) -> DownloadResult:
        progress = _Progress(url, settings, started=time.monotonic() - waited, queued=waited)
        return progress.result(Status.TIMEOUT, "deadline passed while waiting for a per-host slot")

    return pool.submit(
        limit,
        allowed,
        lambda waited: _counted_fetch(url, settings, priority, waited),
        expired=expired,
        timeout=settings.deadline,
        priority=priority,
    )


HOSTS_REPORTED = 8  # per batch: the hosts with the highest limits (the job page's chart)


def host_concurrency(
    urls: Sequence[str], settings: DownloadSettings = DEFAULT_DOWNLOAD
) -> dict[str, tuple[float, int]]:
    """This process's limit and requests in flight for the hosts of ``urls`` (at most
    HOSTS_REPORTED, highest limits first), by ``host`` (``host:port`` off the default
    ports): what a batch reports, so the job page can chart how each host's limit moves."""
    limits = host_limits(settings)
    seen: dict[str, tuple[float, int]] = {}
    for key in set(map(_host_key_or_none, urls)) - {None}:
        state = limits.peek(key)
        if state is not None:
            _, host, port = key
            name = host if port in (80, 443) else f"{host}:{port}"
            seen[name] = (state.limit, state.in_flight)
    return dict(sorted(seen.items(), key=lambda item: -item[1][0])[:HOSTS_REPORTED])


def _host_key_or_none(url: str) -> tuple[str, str, int | None] | None:
    try:
        return _host_key(url)
    except ValueError:  # an unparsable port: never fetched
        return None


# One pool per process whose threads outlive the batch: a pool per batch started and
# stopped up to `parallel` threads for every batch. The pool makes a thread only when none
# is idle. Measured on 3000 web-size images (2 interleaved pairs, whole runs from each
# checkout): the I/O worker's CPU 4.54 / 4.89 -> 4.16 / 3.80 s, `fetch` itself 2.75 /
# 2.79 -> 2.56 / 2.36 s. A URL gets a thread only once its host has a slot
# (keyedpool.KeyedPool): waiting for a slot, it holds none. Before, batches of 128 sent
# at once to one host kept ~512 threads alive, half of them waiting; now ~100-190 on 30k
# tiny images. And a slow host's waiting URLs no longer hold the threads another host's
# URLs need (tests/test_adaptive.py: with 4 threads, a fast host's 12 URLs went out 5.0 s
# after a 1 s host's first request; now within its first round trip). At most 512
# requests of one process at once: beyond, URLs wait their turn in the pool's queue.
_POOL_THREADS = 512
# Each thread exits after this many fetches, a fresh one taking its place (its glibc caches
# go back with it: keyedpool.RenewedThreads). Starting and ending a thread costs ~0.17 ms
# of CPU (measured, loaded machine): 0.3 us per fetch, against ~1-2 ms per fetch.
_THREAD_FETCHES = 500
_pool: tuple[int, KeyedPool] | None = None
_pool_lock = threading.Lock()


def _download_pool() -> KeyedPool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():  # none yet, or inherited through fork
            _pool = (
                os.getpid(),
                KeyedPool(_POOL_THREADS, "imgtasks-dl", retire_after=_THREAD_FETCHES),
            )
        return _pool[1]


# The order batches start in this process: their URLs get a host's slots in that order
# (see HostLimit.acquire). One host at 500 ms, 1000 URLs in batches of 16: unordered,
# the first batch finished 3 s after the first request and the batches came back in
# bunches with the CPU pool idle in between.
_batch_order = itertools.count()


def _counted_fetch(
    url: str, settings: DownloadSettings, priority: tuple[int, ...], waited: float
) -> DownloadResult:
    _this_request.priority = priority
    with counted("fetch"):
        return _fetch(url, settings, waited)
