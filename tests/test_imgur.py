"""imgtasks.imgur against the demo server's fake Imgur API on 127.0.0.1 (never the real one).

The fake gallery (see ``imgtasks.demo.imgur_api._ImgurHandler``) has 3 pages of 60 items,
then empty pages; per 12 items: 8 single images, 1 repost of the previous image's link,
1 album with 3 embedded images, 1 album without embedded images and 1 video, so 11 links
per 12 items.  Expected links are derived from the raw JSON, not assumed.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

import imgtasks.imgur as imgur
from imgtasks.demo import DemoServer, ServerSettings
from imgtasks.download import DownloadSettings, fetch
from imgtasks.imgur import (
    ImgurError,
    ImgurSettings,
    ImgurStats,
    client_id_from_env,
    imgur_links,
)
from imgtasks.sources import batched, classify

pytestmark = pytest.mark.timeout(60)

CLIENT_ID = "test-client-id"
PAGES, PER_PAGE = 3, 60


@pytest.fixture(scope="module")
def server() -> Iterator[DemoServer]:
    with DemoServer(ServerSettings(latency=0.0, jitter=0.0)) as srv:
        yield srv


def api(server: DemoServer, options: str = "") -> str:
    return f"{server.base_url}/imgur/{options + '/' if options else ''}3"


def settings(server: DemoServer, options: str = "", **kw: Any) -> ImgurSettings:
    return ImgurSettings(CLIENT_ID, api_base=api(server, options), **kw)


def raw_page(server: DemoServer, page: int) -> list[dict]:
    resp = requests.get(
        f"{api(server)}/gallery/hot/viral/day/{page}",
        headers={"Authorization": f"Client-ID {CLIENT_ID}"},
        timeout=10,
    )
    resp.raise_for_status()
    body = resp.json()
    assert body["success"] is True and body["status"] == 200
    return body["data"]


def expected_links(server: DemoServer, expand_albums: bool = True) -> list[str]:
    """Reference: every image link of the raw gallery pages, in order, first occurrence."""
    links: list[str] = []
    for page in range(PAGES + 1):
        for item in raw_page(server, page):
            if item["is_album"]:
                images = item.get("images", []) if expand_albums else []
            else:
                images = [item]
            for image in images:
                if not image["type"].startswith("video/") and image["link"] not in links:
                    links.append(image["link"])
    return links


def page_requests(server: DemoServer, options: str = "") -> dict[int, int]:
    """How often each gallery page was requested under ``options``."""
    prefix = f"/imgur/{options + '/' if options else ''}3/gallery/hot/viral/day/"
    return {
        int(uri[len(prefix) :]): n
        for uri, n in server.request_counts().items()
        if uri.startswith(prefix)
    }


@pytest.fixture
def counts(server: DemoServer) -> DemoServer:
    server.reset_counts()
    return server


# ------------------------------------------------------------------------ settings


def test_empty_client_id_is_a_value_error() -> None:
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="IMGUR_CLIENT_ID or pass --imgur-client-id"):
            ImgurSettings(bad)
    with pytest.raises(ValueError, match="spaces or control"):
        ImgurSettings("abc def")


@pytest.mark.parametrize(
    "kw",
    [
        {"section": "nope"},
        {"sort": "../../x"},
        {"window": "decade"},
        {"max_pages": 0},
        {"rate_limit_wait_max": -1},
        {"timeout": 0},
        {"api_base": "ftp://example.com/3"},
        {"api_base": "api.imgur.com/3"},
    ],
)
def test_bad_settings_are_value_errors(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ImgurSettings(CLIENT_ID, **kw)


def test_client_id_not_in_repr_and_page_url() -> None:
    s = ImgurSettings("secret123", api_base="https://api.example/3/")
    assert "secret123" not in repr(s)
    assert s.page_url(4) == "https://api.example/3/gallery/hot/viral/day/4"


def test_client_id_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMGUR_CLIENT_ID", raising=False)
    with pytest.raises(ValueError, match=r"^set IMGUR_CLIENT_ID or pass --imgur-client-id$"):
        client_id_from_env(None)
    with pytest.raises(ValueError):
        client_id_from_env("  ")
    assert client_id_from_env(" given ") == "given"
    monkeypatch.setenv("IMGUR_CLIENT_ID", "from-env")
    assert client_id_from_env(None) == "from-env"
    assert client_id_from_env("explicit") == "explicit"


def test_negative_count_raises_at_call(server: DemoServer) -> None:
    with pytest.raises(ValueError):
        imgur_links(settings(server), -1)


def test_zero_count_makes_no_request(counts: DemoServer) -> None:
    assert list(imgur_links(settings(counts), 0)) == []
    assert page_requests(counts) == {}


# ------------------------------------------------------------------------ the links


def test_links_in_order_across_pages(counts: DemoServer) -> None:
    reference = expected_links(counts)
    per_page = len(expected_links_of_page(counts, 0))
    counts.reset_counts()
    n = per_page + 10  # crosses into page 1
    stats = ImgurStats()
    links = list(imgur_links(settings(counts), n, stats))
    assert links == reference[:n]
    assert stats.links == n and stats.pages == 2
    assert page_requests(counts) == {0: 1, 1: 1}  # page 2 never asked for


def expected_links_of_page(server: DemoServer, page: int) -> list[str]:
    seen: list[str] = []
    for item in raw_page(server, page):
        for image in item.get("images", []) if item["is_album"] else [item]:
            if not image["type"].startswith("video/") and image["link"] not in seen:
                seen.append(image["link"])
    return seen


def test_all_links_until_the_empty_page(counts: DemoServer, caplog: Any) -> None:
    reference = expected_links(counts)
    counts.reset_counts()
    stats = ImgurStats()
    with caplog.at_level(logging.INFO, logger="imgtasks.imgur"):
        links = list(imgur_links(settings(counts), 10_000, stats))
    assert links == reference
    assert page_requests(counts) == {0: 1, 1: 1, 2: 1, 3: 1}  # stopped at empty page 3
    assert stats.pages == PAGES + 1
    albums = PAGES * PER_PAGE // 12
    assert stats.albums_expanded == albums
    assert stats.albums_without_images == albums
    assert stats.videos_skipped == albums
    assert stats.duplicates == albums
    assert "page 3 was empty" in caplog.text
    assert f"albums expanded {albums}" in caplog.text
    base = counts.base_url
    assert all(link.startswith(f"{base}/img/") for link in links)
    assert len(set(links)) == len(links)


def test_videos_skipped_and_albums_expanded(server: DemoServer) -> None:
    items = raw_page(server, 0)
    videos = [i["link"] for i in items if i.get("type", "").startswith("video/")]
    album_images = [im["link"] for i in items if i["is_album"] for im in i.get("images", [])]
    bare_albums = [i for i in items if i["is_album"] and "images" not in i]
    assert videos and album_images and bare_albums  # the fake gallery has all three
    links = list(imgur_links(settings(server, "pages=1"), 1000))
    assert not set(videos) & set(links)
    assert not any(link.endswith(".mp4") for link in links)
    assert set(album_images) <= set(links)
    # an album's images come right where the album is in the gallery
    first_album = next(i for i in items if i["is_album"] and "images" in i)
    at = links.index(first_album["images"][0]["link"])
    assert links[at : at + 3] == [im["link"] for im in first_album["images"]]


def test_albums_skipped_when_not_expanded(server: DemoServer, caplog: Any) -> None:
    reference = expected_links(server, expand_albums=False)
    stats = ImgurStats()
    with caplog.at_level(logging.INFO, logger="imgtasks.imgur"):
        links = list(imgur_links(settings(server, expand_albums=False), 10_000, stats))
    assert links == reference
    assert stats.albums_expanded == 0
    assert stats.albums_skipped == 2 * PAGES * PER_PAGE // 12  # with and without images
    assert "skipped 30" in caplog.text
    album_links = {
        im["link"] for p in range(PAGES) for i in raw_page(server, p) for im in i.get("images", [])
    }
    assert not album_links & set(links)


def test_duplicates_dropped(server: DemoServer) -> None:
    items = raw_page(server, 0)
    singles = [i["link"] for i in items if not i["is_album"] and i["type"].startswith("image/")]
    assert len(singles) > len(set(singles))  # reposts share a link
    stats = ImgurStats()
    links = list(imgur_links(settings(server, "pages=1"), 1000, stats))
    assert len(links) == len(set(links))
    assert stats.duplicates == len(singles) - len(set(singles))


def test_max_pages(counts: DemoServer) -> None:
    stats = ImgurStats()
    links = list(imgur_links(settings(counts, max_pages=2), 10_000, stats))
    assert page_requests(counts) == {0: 1, 1: 1}
    assert links == expected_links(counts)[: len(links)]


def test_configurable_page_count(counts: DemoServer) -> None:
    links = list(imgur_links(settings(counts, "pages=2,per_page=12"), 10_000))
    assert page_requests(counts, "pages=2,per_page=12") == {0: 1, 1: 1, 2: 1}
    assert len(links) == 2 * (8 + 3)


def test_links_feed_the_batches(server: DemoServer) -> None:
    links = imgur_links(settings(server), 40)
    batches = list(batched(classify(links), 16))
    assert [len(b.entries) for b in batches] == [16, 16, 8]
    assert all(e.pending for b in batches for e in b.entries)


def test_links_download(server: DemoServer) -> None:
    links = list(imgur_links(settings(server, "pages=1"), 1000))
    fast = DownloadSettings(deadline=10.0, retries=0)
    picks = links[:3] + [link for link in links if "/img/1000" in link][:3]
    picks += [link for link in links if link.endswith((".png", ".gif", ".webp"))][:3]
    assert len(picks) >= 6
    for link in picks:
        result = fetch(link, fast)
        assert result.ok, (link, result.status, result.error)
        assert result.content_type.startswith("image/")


# ------------------------------------------------------------------------ rate limits


def test_429_retry_after_is_waited(counts: DemoServer, caplog: Any) -> None:
    options = "key=wait429,retry_after=1"
    stats = ImgurStats()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="imgtasks.imgur"):
        links = list(imgur_links(settings(counts, options), 80, stats))
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 8
    assert len(links) == 80
    assert page_requests(counts, options) == {0: 2, 1: 1}
    assert stats.rate_limit_waits == 1
    assert "HTTP 429" in caplog.text


def test_used_up_user_quota_waits_for_reset(counts: DemoServer) -> None:
    # The first answer says "0 left until now+1s"; a request before that would be a 429.
    options = "key=quota,reset_in=1"
    stats = ImgurStats()
    start = time.monotonic()
    links = list(imgur_links(settings(counts, options), 80, stats))
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 8
    assert len(links) == 80
    assert page_requests(counts, options) == {0: 1, 1: 1}  # waited instead of a 429
    assert stats.rate_limit_waits == 1


def test_wait_above_the_cap_is_an_error(counts: DemoServer) -> None:
    start = time.monotonic()
    gen = imgur_links(settings(counts, "key=long,retry_after=120", rate_limit_wait_max=2), 10)
    with pytest.raises(ImgurError, match=r"wait 120s.*rate_limit_wait_max=2s"):
        list(gen)
    assert time.monotonic() - start < 2


def test_used_up_client_quota_is_an_error(server: DemoServer) -> None:
    with pytest.raises(ImgurError, match="daily request limit"):
        list(imgur_links(settings(server, "client_remaining=0", rate_limit_wait_max=0.1), 10))


# ------------------------------------------------------------------------ errors


def test_server_answers_401_without_client_id(server: DemoServer) -> None:
    url = f"{api(server)}/gallery/hot/viral/day/0"
    for headers in ({}, {"Authorization": "Bearer abc"}, {"Authorization": "Client-ID "}):
        resp = requests.get(url, headers=headers, timeout=10)
        assert resp.status_code == 401
        assert resp.json()["success"] is False


def test_401_is_an_imgur_error(server: DemoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    make = imgur._session

    def without_auth(s: ImgurSettings) -> requests.Session:
        session = make(s)
        del session.headers["Authorization"]
        return session

    monkeypatch.setattr(imgur, "_session", without_auth)
    with pytest.raises(ImgurError, match=r"Imgur rejected the client id \(HTTP 401"):
        list(imgur_links(settings(server), 10))


def test_wrong_client_id_is_an_imgur_error(server: DemoServer) -> None:
    gen = imgur_links(settings(server, "client_id=the-right-one"), 10)
    with pytest.raises(ImgurError, match=r"rejected the client id \(HTTP 403: Invalid client_id"):
        list(gen)


def test_other_http_error_is_an_imgur_error(server: DemoServer) -> None:
    s = ImgurSettings(CLIENT_ID, api_base=f"{server.base_url}/nowhere/3")
    with pytest.raises(ImgurError, match="HTTP 404"):
        list(imgur_links(s, 10))


def test_unreachable_api_is_an_imgur_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: connections are refused
    s = ImgurSettings(
        CLIENT_ID, api_base=f"http://127.0.0.1:{port}/3", rate_limit_wait_max=0.01, timeout=2
    )
    with pytest.raises(ImgurError, match="cannot reach the Imgur API"):
        list(imgur_links(s, 10))
