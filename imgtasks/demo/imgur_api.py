"""A fake Imgur gallery API: Imgur-shaped JSON pages whose images the demo server serves.

Enough of ``GET /3/gallery/...`` for `imgtasks.imgur`: Client-ID auth, pagination,
albums, videos and reposts, and the rate-limit headers and 429s, steered per test by
options in the path (see `_ImgurHandler`). Mounted by `imgtasks.demo.server`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from typing import Any

from imgtasks.demo.base import Handler, State, status_reason
from imgtasks.demo.corpus import CorpusItem

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


class _ImgurHandler(Handler):
    """``/imgur[/{options}]/3/gallery/{section}/{sort}/{window}/{page}``: Imgur-shaped JSON.

    Answers 401 without ``Authorization: Client-ID X``; 403 when the ``client_id``
    option is set and X differs.
    Options (comma-separated NAME=VALUE): ``pages``, ``per_page``; ``key`` names the
    state the next three use; ``retry_after=S``: the key's first request is a 429 with
    ``Retry-After: S``; ``reset_in=S``: the key's first answer reports a used-up user
    quota (``X-RateLimit-UserRemaining: 0``, reset in S s) and requests before the reset
    get a 429; ``client_remaining=N`` reports N (0: every request is a 429).
    """

    def initialize(self, state: State, resets: dict[str, float]) -> None:  # type: ignore[override]
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
        self.set_status(status, reason=status_reason(status))
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body).encode())


def imgur_route(state: State) -> tuple[str, type[Handler], dict[str, Any]]:
    """The fake API's route for one server, with that server's rate-limit reset times."""
    pattern = r"/imgur(?:/([\w=,.-]+))?/3/gallery/(\w+)/(\w+)/(\w+)/(\d{1,9})"
    return pattern, _ImgurHandler, {"state": state, "resets": {}}
