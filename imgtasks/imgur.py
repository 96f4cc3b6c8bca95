"""Imgur as a URL source: the direct image links of a gallery section, page by page.

`imgur_links` pages ``GET {api_base}/gallery/{section}/{sort}/{window}/{page}`` (with
``Authorization: Client-ID <id>``) and yields up to ``count`` direct image links:

- single images whose link or type is jpg/jpeg/png/gif/webp are kept;
- videos (``video/*`` types, ``.mp4``/``.gifv``/``.webm`` links) are skipped;
- albums are expanded into their embedded ``images`` (``expand_albums=True``) or skipped;
  an album without embedded images is skipped (no extra ``/album/{id}`` request);
- a link seen before is skipped, so every yielded link is unique.

It stops at ``count`` links, at the first empty page or after ``max_pages`` pages.

Rate limits are respected: a 429 is retried after ``Retry-After`` (or until
``X-RateLimit-UserReset`` when the user quota is used up); a response reporting
``X-RateLimit-UserRemaining: 0`` makes the next request wait for the reset; a used-up
daily client quota (``X-RateLimit-ClientRemaining: 0``) stops with an `ImgurError`, as
does any wait longer than ``rate_limit_wait_max`` (Imgur blocks clients that keep going
over their limits). A rejected client id (401/403) is an `ImgurError` too; bad settings
are a ``ValueError`` when they are built.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

from imgtasks.download import DEFAULT_USER_AGENT, validate_url

log = logging.getLogger(__name__)

API_BASE = "https://api.imgur.com/3"
CLIENT_ID_ENV = "IMGUR_CLIENT_ID"
SECTIONS = ("hot", "top", "user")
SORTS = ("viral", "top", "time", "rising")
WINDOWS = ("day", "week", "month", "year", "all")
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "gif", "webp"})
IMAGE_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png", "image/gif", "image/webp"})
VIDEO_EXTENSIONS = frozenset({"mp4", "gifv", "webm", "mov"})
MAX_ATTEMPTS = 5  # per page: 429s, 5xx and connection errors together
SERVER_ERROR_BACKOFF = 1.0  # seconds, doubled per attempt (capped by rate_limit_wait_max)
MAX_LINK_LENGTH = 2048


class ImgurError(RuntimeError):
    """The Imgur API refused or failed in a way retrying will not fix."""


@dataclass(frozen=True)
class ImgurSettings:
    """Which gallery to read and how politely.  The client id is kept out of ``repr``."""

    client_id: str = field(repr=False)
    api_base: str = API_BASE
    section: str = "hot"
    sort: str = "viral"
    window: str = "day"
    max_pages: int = 50
    expand_albums: bool = True
    rate_limit_wait_max: float = 60.0  # seconds; a longer requested wait is an ImgurError
    timeout: float = 15.0  # seconds, connect and read

    def __post_init__(self) -> None:
        if not isinstance(self.client_id, str) or not self.client_id.strip():
            raise ValueError(
                f"the Imgur client id is empty: set {CLIENT_ID_ENV} or pass --imgur-client-id"
            )
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in self.client_id):
            raise ValueError("the Imgur client id must not contain spaces or control characters")
        parts = urlsplit(self.api_base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"the Imgur API base must be an http(s) URL, got {self.api_base!r}")
        for name, value, allowed in (
            ("section", self.section, SECTIONS),
            ("sort", self.sort, SORTS),
            ("window", self.window, WINDOWS),
        ):
            if value not in allowed:
                raise ValueError(f"Imgur {name} must be one of {allowed}, got {value!r}")
        if self.max_pages < 1:
            raise ValueError(f"max_pages must be >= 1, got {self.max_pages}")
        if not (math.isfinite(self.rate_limit_wait_max) and self.rate_limit_wait_max >= 0):
            raise ValueError("rate_limit_wait_max must be a finite number >= 0")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError("timeout must be a finite number > 0")

    def page_url(self, page: int) -> str:
        base = self.api_base.rstrip("/")
        return f"{base}/gallery/{self.section}/{self.sort}/{self.window}/{page}"


@dataclass
class ImgurStats:
    """What `imgur_links` saw; pass one in to read the counts afterwards."""

    pages: int = 0  # pages requested, the final empty one included
    links: int = 0
    albums_expanded: int = 0
    albums_skipped: int = 0  # expand_albums=False
    albums_without_images: int = 0  # no embedded ``images``: skipped
    videos_skipped: int = 0
    duplicates: int = 0
    other_skipped: int = 0  # not an image, or a malformed item/link
    rate_limit_waits: int = 0
    waited_s: float = 0.0


def client_id_from_env(explicit: str | None) -> str:
    """``explicit`` if given, else ``$IMGUR_CLIENT_ID``; ValueError when neither is set."""
    value = explicit if explicit is not None else os.environ.get(CLIENT_ID_ENV, "")
    value = value.strip()
    if not value:
        raise ValueError(f"set {CLIENT_ID_ENV} or pass --imgur-client-id")
    return value


def imgur_links(
    settings: ImgurSettings, count: int, stats: ImgurStats | None = None
) -> Iterator[str]:
    """Up to ``count`` unique direct image links from the gallery, in gallery order.

    Lazy: pages are requested as links are consumed.  Raises `ImgurError` (while
    iterating) for auth errors, used-up quotas and over-long rate-limit waits.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return _Pager(settings, stats if stats is not None else ImgurStats()).links(count)


class _Pager:
    def __init__(self, settings: ImgurSettings, stats: ImgurStats) -> None:
        self.settings = settings
        self.stats = stats
        self.seen: set[str] = set()
        self.resume_at: float | None = None  # epoch seconds: user quota resets then
        self.client_exhausted = False

    def links(self, count: int) -> Iterator[str]:
        if count == 0:
            return
        stop = f"max_pages={self.settings.max_pages} reached"
        short = True  # warn when fewer links than asked for were found
        with _session(self.settings) as session:
            try:
                for page in range(self.settings.max_pages):
                    items = self.fetch_page(session, page)
                    self.stats.pages += 1
                    if not items:
                        stop = f"page {page} was empty"
                        break
                    for item in items:
                        for link in self.item_links(item):
                            self.stats.links += 1
                            yield link
                            if self.stats.links >= count:
                                stop = f"{count} links collected"
                                return
            except GeneratorExit:
                stop, short = "closed by the consumer", False
                raise
            except ImgurError as exc:
                stop, short = f"stopped by an error: {exc}", False
                raise
            finally:
                self.log_summary(count, stop, warn_short=short)

    # -- items

    def item_links(self, item: Any) -> Iterator[str]:
        stats = self.stats
        if not isinstance(item, Mapping):
            stats.other_skipped += 1
            return
        if not item.get("is_album"):
            yield from self.image_link(item)
            return
        if not self.settings.expand_albums:
            stats.albums_skipped += 1
            return
        images = item.get("images")
        if not isinstance(images, list):
            stats.albums_without_images += 1
            log.debug("album %s has no embedded images: skipped", item.get("id"))
            return
        stats.albums_expanded += 1
        for image in images:
            if isinstance(image, Mapping):
                yield from self.image_link(image)
            else:
                stats.other_skipped += 1

    def image_link(self, image: Mapping[str, Any]) -> Iterator[str]:
        link, kind = image.get("link"), image.get("type")
        kind = kind.lower() if isinstance(kind, str) else ""
        if not isinstance(link, str) or validate_url(link, MAX_LINK_LENGTH) is not None:
            self.stats.other_skipped += 1
            return
        ext = _extension(link)
        if kind.startswith("video/") or ext in VIDEO_EXTENSIONS:
            self.stats.videos_skipped += 1
            return
        if ext not in IMAGE_EXTENSIONS and kind not in IMAGE_TYPES:
            self.stats.other_skipped += 1
            return
        if link in self.seen:
            self.stats.duplicates += 1
            return
        self.seen.add(link)
        yield link

    # -- requests

    def fetch_page(self, session: requests.Session, page: int) -> list[Any]:
        url = self.settings.page_url(page)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            self.respect_quota()
            try:
                resp = session.get(url, timeout=self.settings.timeout)
            except requests.RequestException as exc:
                if attempt == MAX_ATTEMPTS:
                    raise ImgurError(f"cannot reach the Imgur API at {url}: {exc}") from exc
                self.backoff(attempt, f"request failed ({type(exc).__name__})")
                continue
            with resp:
                self.note_quota(resp.headers)
                code = resp.status_code
                if code in (401, 403):
                    raise ImgurError(
                        f"Imgur rejected the client id (HTTP {code}: {_api_error(resp)}); "
                        f"check {CLIENT_ID_ENV} / --imgur-client-id"
                    )
                if code == 429:
                    self.wait(self.retry_wait(resp.headers, attempt), "HTTP 429")
                    continue
                if code >= 500:
                    if attempt == MAX_ATTEMPTS:
                        raise ImgurError(f"Imgur answered HTTP {code} for {url} {attempt} times")
                    self.backoff(attempt, f"HTTP {code}")
                    continue
                if not 200 <= code < 300:
                    raise ImgurError(f"Imgur answered HTTP {code} for {url}: {_api_error(resp)}")
                return _page_items(resp, url)
        raise ImgurError(f"still rate limited after {MAX_ATTEMPTS} attempts at {url}")

    def note_quota(self, headers: Mapping[str, str]) -> None:
        client = _int_header(headers, "X-RateLimit-ClientRemaining")
        user = _int_header(headers, "X-RateLimit-UserRemaining")
        reset = _int_header(headers, "X-RateLimit-UserReset")
        log.debug("Imgur quota: client remaining %s, user remaining %s", client, user)
        self.client_exhausted = client is not None and client <= 0
        self.resume_at = float(reset) if user is not None and user <= 0 and reset else None

    def respect_quota(self) -> None:
        """Before a request: wait for a used-up user quota, stop on a used-up client quota."""
        if self.client_exhausted:
            raise ImgurError(
                "Imgur's daily request limit for this client id is used up "
                "(X-RateLimit-ClientRemaining: 0); try again tomorrow"
            )
        if self.resume_at is not None:
            wait = self.resume_at - time.time()
            self.resume_at = None
            if wait > 0:
                self.wait(wait, "X-RateLimit-UserRemaining: 0 until X-RateLimit-UserReset")

    def retry_wait(self, headers: Mapping[str, str], attempt: int) -> float:
        """Seconds to wait after a 429."""
        retry_after = _retry_after(headers.get("Retry-After"))
        if retry_after is not None:
            return retry_after
        if self.resume_at is not None:
            wait, self.resume_at = self.resume_at - time.time(), None
            return max(wait, 0.0)
        if self.client_exhausted:
            self.respect_quota()  # raises
        return min(SERVER_ERROR_BACKOFF * 2 ** (attempt - 1), self.settings.rate_limit_wait_max)

    def wait(self, seconds: float, why: str) -> None:
        cap = self.settings.rate_limit_wait_max
        if seconds > cap:
            raise ImgurError(
                f"Imgur rate limit: asked to wait {seconds:.0f}s ({why}), more than "
                f"rate_limit_wait_max={cap:g}s"
            )
        log.warning("Imgur rate limit (%s): waiting %.1fs", why, seconds)
        self.stats.rate_limit_waits += 1
        self.stats.waited_s += seconds
        time.sleep(seconds)

    def backoff(self, attempt: int, why: str) -> None:
        seconds = min(SERVER_ERROR_BACKOFF * 2 ** (attempt - 1), self.settings.rate_limit_wait_max)
        log.warning("Imgur API: %s; retrying in %.1fs", why, seconds)
        time.sleep(seconds)

    def log_summary(self, count: int, stop: str, warn_short: bool) -> None:
        s = self.stats
        if warn_short and s.links < count:
            log.warning("Imgur gave %d of the %d links asked for (%s)", s.links, count, stop)
        log.info(
            "Imgur: %d links from %d pages (%s); albums expanded %d, skipped %d, without "
            "embedded images %d; videos skipped %d; duplicates %d; other skipped %d",
            s.links,
            s.pages,
            stop,
            s.albums_expanded,
            s.albums_skipped,
            s.albums_without_images,
            s.videos_skipped,
            s.duplicates,
            s.other_skipped,
        )


def _session(settings: ImgurSettings) -> requests.Session:
    session = requests.Session()
    session.headers.update(
        {
            "Authorization": f"Client-ID {settings.client_id}",
            "User-Agent": DEFAULT_USER_AGENT,
            "Accept": "application/json",
        }
    )
    return session


def _page_items(resp: requests.Response, url: str) -> list[Any]:
    try:
        body = resp.json()
    except ValueError as exc:
        raise ImgurError(f"Imgur answered {url} with something that is not JSON") from exc
    if not isinstance(body, Mapping):
        raise ImgurError(f"unexpected Imgur answer for {url}: not a JSON object")
    if body.get("success") is False:
        raise ImgurError(f"Imgur reported a failure for {url}: {_error_text(body)}")
    data = body.get("data")
    if not isinstance(data, list):
        raise ImgurError(f"unexpected Imgur answer for {url}: 'data' is not a list")
    return data


def _api_error(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.reason or "no details"
    return _error_text(body) if isinstance(body, Mapping) else resp.reason or "no details"


def _error_text(body: Mapping[str, Any]) -> str:
    data = body.get("data")
    error = data.get("error") if isinstance(data, Mapping) else None
    if isinstance(error, Mapping):  # some endpoints nest {"message": ...}
        error = error.get("message")
    return str(error or "no details")[:200]


def _extension(link: str) -> str:
    path = urlsplit(link).path
    name = path.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    try:
        return int(str(value).strip()) if value is not None else None
    except ValueError:
        return None


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None if absent/bad."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


__all__ = [
    "API_BASE",
    "CLIENT_ID_ENV",
    "ImgurError",
    "ImgurSettings",
    "ImgurStats",
    "client_id_from_env",
    "imgur_links",
]
