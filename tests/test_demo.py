"""Tests for imgtasks.demo (corpus, server, faults, fake Imgur API, CLI), over real loopback
sockets."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import non_loopback_address
from PIL import Image, ImageOps

from imgtasks.demo import FAULT_NAMES, DemoServer, Faults, ServerSettings, corpus
from imgtasks.demo import base as demo_base
from imgtasks.demo.cli import main
from imgtasks.demo.corpus import CorpusItem, load_corpus

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 10


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def photos() -> tuple[CorpusItem, ...]:
    """The photo corpus (generated once per machine, then read from the disk cache)."""
    return load_corpus("photos")


@pytest.fixture(scope="session")
def tiny() -> tuple[CorpusItem, ...]:
    return load_corpus("tiny")


@pytest.fixture(scope="session")
def web() -> tuple[CorpusItem, ...]:
    """The web-size corpus (a few seconds the first time on a machine, then cached)."""
    return load_corpus("web")


@pytest.fixture(scope="module")
def server(photos: tuple[CorpusItem, ...]) -> Iterator[DemoServer]:
    with DemoServer(ServerSettings(latency=0.0, jitter=0.0)) as srv:
        yield srv


@pytest.fixture()
def http() -> Iterator[requests.Session]:
    """A session that ignores proxy variables: every request must stay on loopback."""
    with requests.Session() as session:
        session.trust_env = False
        yield session


def _get(http: requests.Session, url: str, **kw: object) -> requests.Response:
    kw.setdefault("timeout", TIMEOUT)
    return http.get(url, **kw)  # type: ignore[arg-type]


def _jpegs(items: tuple[CorpusItem, ...]) -> list[CorpusItem]:
    return [item for item in items if item.ext == "jpg"]


def _raw_get(port: int, target: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send one HTTP/1.1 request with a raw path (no client-side normalisation)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception:
        return False
    return True


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# --------------------------------------------------------------------------- corpus


def test_tiny_corpus_is_deterministic_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = corpus.generate_corpus("tiny")
    assert first == corpus.generate_corpus("tiny")
    monkeypatch.setenv(corpus.CACHE_ENV_VAR, str(tmp_path))
    corpus.load_corpus.cache_clear()
    try:
        assert corpus.load_corpus("tiny") == first
        cached = corpus.corpus_dir("tiny")
        assert cached.is_relative_to(tmp_path)
        assert f"v{corpus.CORPUS_VERSION}" in str(cached)
        assert len(list(cached.glob("*.jpg"))) == len(first)

        def boom(*_a: object, **_k: object) -> None:
            raise AssertionError("regenerated despite the cache")

        monkeypatch.setattr(corpus, "generate_corpus", boom)
        corpus.load_corpus.cache_clear()
        assert corpus.load_corpus("tiny") == first  # read back from disk
        assert corpus.load_corpus("tiny") is corpus.load_corpus("tiny")  # in-process cache
    finally:
        corpus.load_corpus.cache_clear()


def test_cache_write_races_are_harmless(tmp_path: Path, tiny: tuple[CorpusItem, ...]) -> None:
    target = tmp_path / "race"
    errors: list[BaseException] = []

    def write() -> None:
        try:
            corpus._write_cache(tiny, target)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors
    assert corpus._read_cache(target) == tiny
    assert [p.name for p in tmp_path.iterdir()] == ["race"]  # no temp dirs left over


def test_photo_items_regenerate_identically(photos: tuple[CorpusItem, ...]) -> None:
    jobs = corpus._jobs("photos", corpus.DEFAULT_SEED)
    big = max(range(len(photos)), key=lambda i: photos[i].pixels)
    for index in (0, big):
        assert corpus._encode(*jobs[index]) == photos[index]


def test_photo_corpus_composition(photos: tuple[CorpusItem, ...]) -> None:
    assert 40 <= len(photos) <= 64
    assert len({item.name for item in photos}) == len(photos)
    by_ext = {ext: [i for i in photos if i.ext == ext] for ext in ("jpg", "png", "webp", "gif")}
    assert len(by_ext["jpg"]) >= len(photos) * 0.6
    assert all(by_ext.values())
    pixels = [item.pixels for item in photos]
    assert max(pixels) == 4000 * 3000
    assert min(min(i.width, i.height) for i in photos) >= 300
    twelve_mp = [i for i in by_ext["jpg"] if i.pixels == 12_000_000]
    assert len(twelve_mp) >= 5
    for item in twelve_mp:  # realistic phone-photo sizes at q=90
        assert 1.2e6 <= len(item.data) <= 4.5e6, item.name
    for item in photos:
        with Image.open(io.BytesIO(item.data)) as img:
            assert img.size == (item.width, item.height)
            assert Image.MIME[img.format] == item.content_type


def test_jpeg_variants(photos: tuple[CorpusItem, ...]) -> None:
    rotated = progressive = portrait = 0
    for item in _jpegs(photos):
        with Image.open(io.BytesIO(item.data)) as img:
            orientation = img.getexif().get(0x0112, 1)
            assert orientation == item.orientation
            if item.progressive:
                assert img.info.get("progressive")
                progressive += 1
            if orientation == 6:
                rotated += 1
                upright = ImageOps.exif_transpose(img)
                assert upright.size == (img.height, img.width)
            portrait += img.height > img.width
    assert rotated >= 2
    assert progressive >= 2
    assert portrait >= 2


def test_alpha_png_and_animated_gif(photos: tuple[CorpusItem, ...]) -> None:
    pngs = [i for i in photos if i.ext == "png"]
    for item in pngs:
        with Image.open(io.BytesIO(item.data)) as img:
            assert img.mode == "RGBA"
            alpha = np.asarray(img.getchannel("A"))
            # Real alpha: fully transparent, opaque and in-between pixels all occur.
            assert (alpha == 0).mean() > 0.02
            assert (alpha == 255).mean() > 0.02
            assert ((alpha > 0) & (alpha < 255)).mean() > 0.001
    gifs = [i for i in photos if i.ext == "gif"]
    for item in gifs:
        with Image.open(io.BytesIO(item.data)) as img:
            assert 2 <= img.n_frames <= 4
            assert img.is_animated
            frames = []
            for n in range(img.n_frames):
                img.seek(n)
                frames.append(np.asarray(img.convert("RGB")))
            assert not np.array_equal(frames[0], frames[1])
            assert 320 <= img.width <= 640


def test_images_look_like_photos(photos: tuple[CorpusItem, ...]) -> None:
    for item in photos:
        with Image.open(io.BytesIO(item.data)) as img:
            img.draft("RGB", (400, 400))
            small = np.asarray(img.convert("RGB").resize((200, 150)), np.float32)
        std = small.std()
        # Neighbouring pixels are similar (not noise) but the image varies (not flat).
        neighbour = np.abs(np.diff(small, axis=1)).mean()
        assert std > 15, item.name
        assert neighbour < std / 2, item.name
    for item in _jpegs(photos):
        bits_per_pixel = 8 * len(item.data) / item.pixels
        assert 0.2 < bits_per_pixel < 6, item.name


def test_tiny_corpus(tiny: tuple[CorpusItem, ...]) -> None:
    assert len(tiny) == 16
    for item in tiny:
        assert item.ext == "jpg"
        assert 64 <= item.width <= 200 and 48 <= item.height <= 150
        assert 500 < len(item.data) < 20_000
        assert _decodes(item.data)


def test_web_corpus_is_web_size_and_mixed(web: tuple[CorpusItem, ...]) -> None:
    assert len(web) == corpus.WEB_COUNT
    assert len({item.data for item in web}) == len(web)  # distinct images, not copies
    assert {max(item.width, item.height) for item in web} == {corpus.WEB_SIDE}
    assert any(item.height > item.width for item in web)  # portraits too
    by_ext = {ext: [i for i in web if i.ext == ext] for ext in ("jpg", "png", "webp")}
    assert len(by_ext["jpg"]) >= 0.7 * len(web)
    assert len(by_ext["png"]) >= 10 and len(by_ext["webp"]) >= 10
    for items in by_ext.values():  # ~20-60 KB, like most of a real crawl
        mean_kb = sum(len(i.data) for i in items) / len(items) / 1000
        assert 20 <= mean_kb <= 60, (items[0].ext, mean_kb)
    for item in web[:30]:
        with Image.open(io.BytesIO(item.data)) as img:
            assert img.size == (item.width, item.height)
            assert corpus.CONTENT_TYPES[item.ext] == Image.MIME[img.format]
    jobs = corpus._jobs("web", corpus.DEFAULT_SEED)
    for index in (0, 7, 13):  # the cache holds what generation makes
        assert corpus._encode(*jobs[index]) == web[index]


def test_bomb_png_is_small_and_declares_400_megapixels() -> None:
    data = corpus.make_bomb_png()
    assert len(data) < 100_000
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (20000, 20000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    small = corpus.make_bomb_png(64, 32)
    with Image.open(io.BytesIO(small)) as img:
        img.load()
        assert img.size == (64, 32)


def test_truncate_and_corrupt(photos: tuple[CorpusItem, ...]) -> None:
    data = _jpegs(photos)[0].data
    assert corpus.truncate(data, 0.5) == data[: len(data) // 2]
    with pytest.raises(ValueError):
        corpus.truncate(data, 1.5)
    for item in _jpegs(photos)[:6]:
        bad = corpus.corrupt_jpeg(item.data)
        assert bad == corpus.corrupt_jpeg(item.data)
        assert len(bad) == len(item.data) and bad != item.data
        assert not _decodes(bad)
    with pytest.raises(ValueError):
        corpus.corrupt_jpeg(b"not a jpeg")
    with pytest.raises(ValueError):
        corpus.load_corpus("nope")


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "kwargs",
    [{"html": -0.1}, {"drip": 1.5}, {"not_found": 0.6, "server_error": 0.5}, {"drip_rate": 0}],
)
def test_faults_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Faults(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"latency": -1}, {"jitter": -0.1}, {"bandwidth": 0}, {"port": 70000}, {"corpus": "x"}],
)
def test_settings_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ServerSettings(**kwargs)  # type: ignore[arg-type]


def test_fault_mix_is_deterministic_and_matches_fractions() -> None:
    faults = Faults(**{name: 0.1 for name in FAULT_NAMES})
    n = 4000
    expected = faults.expected(n)
    assert expected == Faults(**{name: 0.1 for name in FAULT_NAMES}).expected(n)
    assert sum(expected.values()) == n
    for name in FAULT_NAMES:
        assert abs(expected[name] - 0.1 * n) < 0.025 * n, (name, expected)
    assert abs(expected["ok"] - 0.3 * n) < 0.03 * n
    assert Faults().expected(100) == {**dict.fromkeys(FAULT_NAMES, 0), "ok": 100}
    assert all(Faults(html=1.0).fault_for(i) == "html" for i in range(50))


# --------------------------------------------------------------------------- routes


def test_img_route_serves_corpus_bytes(
    server: DemoServer, http: requests.Session, photos: tuple[CorpusItem, ...]
) -> None:
    n = len(photos)
    for index in (0, 1, 5, n + 5, 10 * n + 3):
        item = photos[index % n]
        r = _get(http, f"{server.base_url}/img/{index}.{item.ext}")
        assert r.status_code == 200
        assert r.headers["Content-Type"] == item.content_type
        assert int(r.headers["Content-Length"]) == len(item.data)
        assert r.content == item.data
    # The extension is cosmetic.
    assert _get(http, f"{server.base_url}/img/5.png").content == photos[5].data


def test_tiny_route(
    server: DemoServer, http: requests.Session, tiny: tuple[CorpusItem, ...]
) -> None:
    r = _get(http, f"{server.base_url}/tiny/17.jpg")
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    assert r.content == tiny[17 % len(tiny)].data


def test_web_route_and_urls(
    server: DemoServer, http: requests.Session, web: tuple[CorpusItem, ...]
) -> None:
    urls = server.urls(2 * len(web) + 3, kind="web")
    assert len(set(urls)) == len(urls)  # every URL distinct, so every one is fetched
    listed = _get(http, f"{server.base_url}/urls?count={len(urls)}&kind=web").text.split()
    assert listed == urls
    for index in (0, 3, len(web) + 3, 2 * len(web) + 2):
        item = web[index % len(web)]
        assert urls[index] == f"{server.base_url}/web/{index}.{item.ext}"
        r = _get(http, urls[index])
        assert r.status_code == 200 and r.headers["Content-Type"] == item.content_type
        assert r.content == item.data


def test_web_corpus_setting_serves_it_at_img(
    http: requests.Session, web: tuple[CorpusItem, ...]
) -> None:
    with DemoServer(ServerSettings(latency=0.0, jitter=0.0, corpus="web")) as srv:
        url = srv.urls(5)[4]
        assert url.endswith(f"/img/4.{web[4].ext}")
        assert _get(http, url).content == web[4].data


def test_urls_route_and_method(
    server: DemoServer, http: requests.Session, photos: tuple[CorpusItem, ...]
) -> None:
    urls = server.urls(100)
    assert len(urls) == 100 and len(set(urls)) == 100
    assert all(u.startswith(server.base_url + "/img/") for u in urls)
    assert urls[3].endswith(f"/img/3.{photos[3].ext}")
    r = _get(http, f"{server.base_url}/urls?count=100")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert r.text.splitlines() == urls
    tiny_urls = _get(http, f"{server.base_url}/urls?count=5&kind=tiny").text.splitlines()
    assert tiny_urls == server.urls(5, kind="tiny")
    assert tiny_urls[4] == f"{server.base_url}/tiny/4.jpg"
    assert _get(http, f"{server.base_url}/urls?count=0").text == ""
    for bad in ("count=-1", "count=abc", "count=3&kind=zzz"):
        assert _get(http, f"{server.base_url}/urls?{bad}").status_code == 400
    with pytest.raises(ValueError):
        server.urls(3, kind="zzz")


@pytest.mark.parametrize("code", [404, 403, 410, 500, 408, 429, 503])
def test_status_route(server: DemoServer, http: requests.Session, code: int) -> None:
    r = _get(http, f"{server.base_url}/status/{code}")
    assert r.status_code == code
    assert str(code) in r.text


def test_unknown_route_is_404(server: DemoServer, http: requests.Session) -> None:
    assert _get(http, f"{server.base_url}/no/such/thing").status_code == 404


@pytest.mark.parametrize("code", [503, 429, 500])
def test_flaky_route(
    server: DemoServer, http: requests.Session, photos: tuple[CorpusItem, ...], code: int
) -> None:
    url = f"{server.base_url}/flaky/k{code}-{time.monotonic_ns()}/2/{code}/7.jpg"
    for _ in range(2):
        r = _get(http, url)
        assert r.status_code == code
        assert r.headers.get("Retry-After") == ("1" if code in (429, 503) else None)
    r = _get(http, url)
    assert r.status_code == 200 and r.content == photos[7].data
    assert _get(http, url).status_code == 200


def test_drip_respects_rate(server: DemoServer, http: requests.Session) -> None:
    jpegs = _jpegs(load_corpus("photos"))
    index = min(range(len(jpegs)), key=lambda i: len(jpegs[i].data))
    size = len(jpegs[index].data)
    rate = size  # about one second
    start = time.monotonic()
    r = _get(http, f"{server.base_url}/drip/{index}.jpg?rate={rate}")
    elapsed = time.monotonic() - start
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == size
    assert r.content == jpegs[index].data
    assert 0.6 < elapsed < 8
    assert _get(http, f"{server.base_url}/drip/1.jpg?rate=0").status_code == 400


def test_drip_client_disconnect_is_quiet(
    server: DemoServer, http: requests.Session, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for path in ("/drip/1.jpg?rate=2000", "/huge?bytes=100000000", "/hang"):
        with contextlib.suppress(requests.Timeout):
            r = _get(http, server.base_url + path, stream=True, timeout=0.5)
            next(r.iter_content(1000))
            r.close()
    time.sleep(0.5)
    noisy = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert not noisy, [rec.getMessage() for rec in noisy]
    assert _get(http, f"{server.base_url}/html").status_code == 200


def test_hang_never_answers(server: DemoServer, http: requests.Session) -> None:
    with pytest.raises(requests.ReadTimeout):
        _get(http, f"{server.base_url}/hang", timeout=(TIMEOUT, 0.5))


def test_truncated_route(server: DemoServer, http: requests.Session) -> None:
    full = _jpegs(load_corpus("photos"))[2].data
    r = _get(http, f"{server.base_url}/truncated/2.jpg")
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == len(r.content) == int(len(full) * 0.6)
    assert r.content == full[: len(r.content)]
    assert not _decodes(r.content)


def test_short_body_is_shorter_than_content_length(server: DemoServer) -> None:
    full = _jpegs(load_corpus("photos"))[3].data
    status, headers, body = _split_response(_raw_get(server.port, b"/short/3.jpg"))
    assert status == 200
    assert int(headers["content-length"]) == len(full)
    assert 0 < len(body) < len(full)
    assert abs(len(body) - len(full) / 2) <= 1
    assert body == full[: len(body)]


def test_short_body_fails_in_requests(server: DemoServer, http: requests.Session) -> None:
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        _get(http, f"{server.base_url}/short/0.jpg")


def test_html_empty_mislabeled(server: DemoServer, http: requests.Session) -> None:
    r = _get(http, f"{server.base_url}/html")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert b"<html" in r.content
    r = _get(http, f"{server.base_url}/empty")
    assert r.status_code == 200 and r.headers["Content-Length"] == "0" and r.content == b""
    r = _get(http, f"{server.base_url}/mislabeled/4.jpg")
    assert r.headers["Content-Type"] == "text/plain"
    assert r.content == _jpegs(load_corpus("photos"))[4].data


def test_redirect_chain(
    server: DemoServer, http: requests.Session, photos: tuple[CorpusItem, ...]
) -> None:
    r = _get(http, f"{server.base_url}/redirect/3/5.jpg")
    assert r.status_code == 200 and r.content == photos[5].data
    assert [h.status_code for h in r.history] == [302, 302, 302]
    assert r.url == f"{server.base_url}/img/5.jpg"
    first = _get(http, f"{server.base_url}/redirect/3/5.jpg", allow_redirects=False)
    assert first.status_code == 302 and first.headers["Location"].endswith("/redirect/2/5.jpg")
    assert len(_get(http, f"{server.base_url}/redirect/25/1.jpg").history) == 25


def test_redirect_loop(server: DemoServer, http: requests.Session) -> None:
    r = _get(http, f"{server.base_url}/loop", allow_redirects=False)
    assert r.status_code == 302 and r.headers["Location"].endswith("/loop")
    with pytest.raises(requests.TooManyRedirects):
        _get(http, f"{server.base_url}/loop")


@pytest.mark.parametrize(
    "target", ["ftp://x/y", "file:///etc/passwd", "http://127.0.0.1:9/nothing"]
)
def test_redirect_to_is_verbatim(server: DemoServer, http: requests.Session, target: str) -> None:
    r = _get(http, f"{server.base_url}/redirect-to", params={"url": target}, allow_redirects=False)
    assert r.status_code == 302 and r.headers["Location"] == target


def test_bomb_route(server: DemoServer, http: requests.Session) -> None:
    r = _get(http, f"{server.base_url}/bomb.png")
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
    assert r.content == corpus.make_bomb_png()
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(r.content))


def test_huge_streams_without_buffering(server: DemoServer, http: requests.Session) -> None:
    total = 50 * 2**20
    before = _rss_bytes()
    peak = 0
    received = 0
    with _get(http, f"{server.base_url}/huge?bytes={total}", stream=True) as r:
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
        assert int(r.headers["Content-Length"]) == total
        for chunk in r.iter_content(1 << 20):
            received += len(chunk)
            peak = max(peak, _rss_bytes())
    assert received == total
    assert peak - before < 30 * 2**20  # buffering the body would add >= 50 MB


def test_huge_without_length_is_chunked(server: DemoServer, http: requests.Session) -> None:
    r = _get(http, f"{server.base_url}/huge?bytes=300000&length=0")
    assert r.status_code == 200 and "Content-Length" not in r.headers
    assert r.headers["Transfer-Encoding"] == "chunked"
    assert len(r.content) == 300000 and r.content[:2] == b"\xff\xd8"
    assert _get(http, f"{server.base_url}/huge?bytes=-5").status_code == 400


def test_corrupt_route(server: DemoServer, http: requests.Session) -> None:
    a = _get(http, f"{server.base_url}/corrupt/3.jpg")
    b = _get(http, f"{server.base_url}/corrupt/3.jpg")
    assert a.status_code == 200 and a.headers["Content-Type"] == "image/jpeg"
    assert a.content == b.content
    assert a.content[:2] == b"\xff\xd8"
    assert not _decodes(a.content)


@pytest.mark.parametrize(
    "path",
    [
        "/any/..%2F..%2F..%2Fetc%2Fpasswd",
        "/any/%2e%2e%2F%2e%2e%2Fetc",
        "/any/a/b/c.jpg?x=1",
        "/any/%C3%BCber/%E6%97%A5%E6%9C%AC.jpg",
        "/any/%FF%FE",
        "/any/",
    ],
)
def test_any_route_accepts_hostile_paths(
    server: DemoServer, http: requests.Session, path: str
) -> None:
    r1 = _get(http, server.base_url + path)
    r2 = _get(http, server.base_url + path)
    assert r1.status_code == 200, path
    assert r1.headers["Content-Type"].startswith("image/")
    assert r1.content == r2.content  # stable choice per path


def test_any_route_with_raw_dot_segments_and_utf8(server: DemoServer) -> None:
    for target in (b"/any/../../etc/passwd", "/any/ü/日本.jpg".encode(), b"/any/..%2F..%2Fx"):
        status, headers, body = _split_response(_raw_get(server.port, target))
        assert status == 200, target
        assert headers["content-type"].startswith("image/")
        assert len(body) == int(headers["content-length"])


def test_stats_and_request_counts(photos: tuple[CorpusItem, ...], http: requests.Session) -> None:
    with DemoServer(ServerSettings(latency=0.0, jitter=0.0)) as srv:
        for _ in range(3):
            _get(http, f"{srv.base_url}/img/2.jpg")
        _get(http, f"{srv.base_url}/urls?count=2")
        _get(http, f"{srv.base_url}/nowhere")
        counts = srv.request_counts()
        assert counts == {"/img/2.jpg": 3, "/urls?count=2": 1, "/nowhere": 1}
        stats = _get(http, f"{srv.base_url}/stats").json()
        assert stats["requests"]["/img/2.jpg"] == 3
        srv.reset_counts()
        assert srv.request_counts() == {}


def test_request_counts_keep_the_latest_paths_only(
    http: requests.Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that served a million URLs held a count for each (140 MiB): counts are
    kept for the latest COUNTED_PATHS distinct paths; a path asked again is the latest."""
    monkeypatch.setattr(demo_base, "COUNTED_PATHS", 3)
    with DemoServer(ServerSettings(latency=0.0, jitter=0.0)) as srv:
        for path in ("/tiny/1.jpg", "/tiny/2.jpg", "/tiny/1.jpg", "/tiny/3.jpg", "/tiny/4.jpg"):
            _get(http, f"{srv.base_url}{path}")
        assert srv.request_counts() == {"/tiny/1.jpg": 2, "/tiny/3.jpg": 1, "/tiny/4.jpg": 1}
        assert len(srv.request_log("/tiny/")) == 5  # the request log has its own bound


def test_faults_on_img_urls(tiny: tuple[CorpusItem, ...], http: requests.Session) -> None:
    faults = Faults(
        not_found=0.1,
        server_error=0.1,
        flaky_503=0.1,
        rate_limited=0.1,
        drip=0.1,
        truncated=0.1,
        html=0.1,
        drip_rate=200_000,
    )
    settings = ServerSettings(latency=0.0, jitter=0.0, faults=faults, corpus="tiny")
    n = 120
    with DemoServer(settings) as srv:
        seen = {}
        for index, url in enumerate(srv.urls(n)):
            item = tiny[index % len(tiny)]
            fault = faults.fault_for(index)
            r = _get(http, url)
            seen[fault] = seen.get(fault, 0) + 1
            if fault is None or fault == "drip":
                assert r.status_code == 200 and r.content == item.data
            elif fault == "not_found":
                assert r.status_code == 404
            elif fault == "server_error":
                assert r.status_code == 500
                assert _get(http, url).status_code == 500  # always
            elif fault == "flaky_503":
                assert r.status_code == 503 and r.headers["Retry-After"] == "1"
                assert _get(http, url).status_code == 503
                assert _get(http, url).content == item.data
            elif fault == "rate_limited":
                assert r.status_code == 429 and r.headers["Retry-After"] == "1"
                assert _get(http, url).content == item.data
            elif fault == "truncated":
                assert r.status_code == 200
                assert r.content == item.data[: int(len(item.data) * 0.6)]
            elif fault == "html":
                assert r.status_code == 200
                assert r.headers["Content-Type"].startswith("text/html")
        assert set(seen) == {None, *FAULT_NAMES}
        expected = faults.expected(n)
        assert {k or "ok": v for k, v in seen.items()} == expected
        # Flaky state is per server and forgotten by reset_counts().
        flaky = next(i for i in range(n) if faults.fault_for(i) == "flaky_503")
        assert _get(http, srv.urls(flaky + 1)[flaky]).status_code == 200
        srv.reset_counts()
        assert _get(http, srv.urls(flaky + 1)[flaky]).status_code == 503


# --------------------------------------------------------------------------- behaviour


def test_latency_is_applied(http: requests.Session) -> None:
    with DemoServer(ServerSettings(latency=0.3, jitter=0.0, corpus="tiny")) as srv:
        for _ in range(2):
            start = time.monotonic()
            assert _get(http, f"{srv.base_url}/img/1.jpg").status_code == 200
            assert time.monotonic() - start >= 0.29
    with DemoServer(ServerSettings(latency=0.2, jitter=0.1, corpus="tiny")) as srv:
        start = time.monotonic()
        _get(http, f"{srv.base_url}/html")
        assert time.monotonic() - start >= 0.09


def test_bandwidth_limit(http: requests.Session, tiny: tuple[CorpusItem, ...]) -> None:
    size = len(tiny[0].data)
    with DemoServer(ServerSettings(latency=0, jitter=0, bandwidth=size * 2)) as srv:
        start = time.monotonic()
        r = _get(http, f"{srv.base_url}/tiny/0.jpg")
        assert r.content == tiny[0].data
        assert time.monotonic() - start >= 0.35


def test_many_concurrent_connections_overlap(tiny: tuple[CorpusItem, ...]) -> None:
    with DemoServer(ServerSettings(latency=0.5, jitter=0.0, corpus="tiny")) as srv:
        socks = []
        start = time.monotonic()
        try:
            for i in range(256):
                sock = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
                socks.append(sock)
                sock.sendall(f"GET /tiny/{i}.jpg HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            for i, sock in enumerate(socks):
                expected = tiny[i % len(tiny)].data
                buf = b""
                while b"\r\n\r\n" not in buf or len(buf.partition(b"\r\n\r\n")[2]) < len(expected):
                    chunk = sock.recv(65536)
                    assert chunk, "connection closed early"
                    buf += chunk
                status, _, body = _split_response(buf)
                assert status == 200 and body == expected
        finally:
            for sock in socks:
                sock.close()
        # Sequential handling would take 256 * 0.5 s.
        assert time.monotonic() - start < 10


def test_keep_alive_reuses_the_connection(server: DemoServer) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/tiny/1.jpg")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        conn.request("GET", "/html")
        second = conn.getresponse()
        assert second.read().startswith(b"<!doctype html>")
        assert conn.sock is sock and sock is not None
    finally:
        conn.close()


def test_binds_loopback_only(server: DemoServer) -> None:
    assert server.base_url == f"http://127.0.0.1:{server.port}"
    ip = non_loopback_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with pytest.raises(OSError), socket.create_connection((ip, server.port), timeout=2):
        pass


def test_stop_frees_port_and_does_not_wait_for_hanging_clients() -> None:
    srv = DemoServer(ServerSettings(latency=0.0, jitter=0.0, corpus="tiny")).start()
    port = srv.port
    hanging = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    hanging.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
    dripping = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    dripping.sendall(b"GET /drip/0.jpg?rate=10 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    start = time.monotonic()
    srv.stop()
    assert time.monotonic() - start < 3
    srv.stop()  # idempotent
    try:
        # The hanging client sees the connection closed, without a response.
        assert hanging.recv(1024) == b""
    finally:
        hanging.close()
        dripping.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(RuntimeError):
        _ = srv.base_url
    # The same port can be bound again right away.
    with DemoServer(ServerSettings(port=port, latency=0.0, jitter=0.0, corpus="tiny")) as again:
        assert again.port == port


def test_start_reports_bind_errors() -> None:
    with DemoServer(ServerSettings(latency=0, jitter=0, corpus="tiny")) as srv:
        clash = DemoServer(ServerSettings(port=srv.port, corpus="tiny"))
        # SO_REUSEADDR still refuses a port with an active listener.
        with pytest.raises(OSError):
            clash.start()


# --------------------------------------------------------------------------- CLI


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env.pop(var, None)
    return env


def test_cli_help_and_bad_args(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--port" in out and "/urls?count=N" in out
    for bad in (
        ["--port", "abc"],
        ["--latency", "-1"],
        ["--fault", "bogus=0.1"],
        ["--fault", "html=2"],
        ["--nope"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2, bad


def test_cli_module_serves_until_interrupted(http: requests.Session) -> None:
    help_run = subprocess.run(
        [sys.executable, "-m", "imgtasks.demo", "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_run.returncode == 0 and "--latency" in help_run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "imgtasks.demo", "--port", "x"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    with _cli_server("--latency", "0", "--corpus", "tiny", "--count", "7") as (base, line):
        assert "urls?count=7" in line
        lines = _get(http, f"{base}/urls?count=7").text.splitlines()
        assert len(lines) == 7


@contextlib.contextmanager
def _cli_server(*args: str) -> Iterator[tuple[str, str]]:
    """``python -m imgtasks.demo --port 0 ARGS``: yields its base URL and startup
    line, then stops it with Ctrl-C, which must exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgtasks.demo", "--port", "0", *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        match, deadline = None, time.monotonic() + 60
        while match is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            match = re.search(r"serving (http://127\.0\.0\.1:\d+)", line)
        assert match is not None, "no startup line"
        yield match.group(1), line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stats_is_json(server: DemoServer, http: requests.Session) -> None:
    r = _get(http, f"{server.base_url}/stats")
    assert r.headers["Content-Type"] == "application/json"
    assert isinstance(json.loads(r.text)["requests"], dict)


def test_server_process_serves_then_stops() -> None:
    from imgtasks.demo import server_process

    with server_process(0.0, 0.0) as (base, pid):
        assert base.startswith("http://127.0.0.1:")
        urls = requests.get(f"{base}/urls", params={"count": 3}, timeout=10).text.split()
        assert len(urls) == 3
        assert requests.get(urls[0], timeout=10).content[:2] == b"\xff\xd8"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped


# --------------------------------------------------------------------------- /files/


@pytest.fixture(scope="module")
def files_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoServer]:
    """A server over a directory with two files, a subdirectory, a dotfile and a symlink;
    a secret sits next to the directory, where traversal would find it."""
    root = tmp_path_factory.mktemp("files")
    served = root / "served"
    (served / "sub").mkdir(parents=True)
    (served / "a.bin").write_bytes(b"\x00\x01binary\xff")
    (served / "Photo_2-x.jpg").write_bytes(b"\xff\xd8jpeg")
    (served / "sub" / "inner.bin").write_bytes(b"inner")
    (served / ".hidden").write_bytes(b"hidden")
    (root / "secret.txt").write_bytes(b"secret")
    (served / "link.txt").symlink_to(root / "secret.txt")
    with DemoServer(ServerSettings(latency=0.0, jitter=0.0, files_dir=str(served))) as srv:
        yield srv


def test_files_route_serves_the_bytes(files_server: DemoServer, http: requests.Session) -> None:
    for name, body in (("a.bin", b"\x00\x01binary\xff"), ("Photo_2-x.jpg", b"\xff\xd8jpeg")):
        r = _get(http, files_server.file_url(name))
        assert (r.status_code, r.content) == (200, body), name
        assert r.headers["Content-Type"] == "application/octet-stream"


@pytest.mark.parametrize(
    "target",
    [
        b"/files/../secret.txt",
        b"/files/..%2Fsecret.txt",
        b"/files/%2E%2E%2Fsecret.txt",
        b"/files/..",
        b"/files/.",
        b"/files/",
        b"/files",
        b"/files/sub/inner.bin",
        b"/files/sub%2Finner.bin",
        b"/files/sub",
        b"/files/.hidden",
        b"/files/link.txt",
        b"/files/missing.bin",
        b"/files/%2Fetc%2Fpasswd",
        b"/files//etc/passwd",
        b"/files/a.bin%00",
        b"/files/%FF%FE",
        b"/files/a.bin/",
        b"/files/..%5Csecret.txt",
    ],
)
def test_files_route_refuses_everything_else(files_server: DemoServer, target: bytes) -> None:
    status, _, body = _split_response(_raw_get(files_server.port, target))
    assert status == 404, target
    assert b"secret" not in body and b"inner" not in body and b"hidden" not in body


def test_files_route_is_404_without_a_directory(server: DemoServer, http: requests.Session) -> None:
    assert _get(http, f"{server.base_url}/files/a.bin").status_code == 404


def test_files_route_has_the_usual_latency(tmp_path: Path, http: requests.Session) -> None:
    (tmp_path / "x.bin").write_bytes(b"x")
    settings = ServerSettings(latency=0.3, jitter=0.0, files_dir=str(tmp_path))
    with DemoServer(settings) as srv:
        start = time.monotonic()
        assert _get(http, srv.file_url("x.bin")).content == b"x"
        assert time.monotonic() - start >= 0.3


def test_files_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="files_dir"):
        ServerSettings(files_dir=str(tmp_path / "nope"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError, match="files_dir"):
        ServerSettings(files_dir=str(tmp_path / "file"))
    with pytest.raises(SystemExit) as exc:
        main(["--files-dir", str(tmp_path / "nope")])
    assert exc.value.code == 2


def test_cli_files_dir_serves_files(tmp_path: Path, http: requests.Session) -> None:
    (tmp_path / "f.bin").write_bytes(b"from the cli")
    args = ("--latency", "0", "--corpus", "tiny", "--files-dir", str(tmp_path))
    with _cli_server(*args) as (base, _startup_line):
        assert _get(http, f"{base}/files/f.bin").content == b"from the cli"
