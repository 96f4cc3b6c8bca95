"""The live job page (issue 17): its figures, where it is served, and (in headless Chromium)
what it draws during a run, checked against the manifest at the end."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import free_port, kill_tree, start_flow, wait_for_dashboard
from distributed import Client
from PIL import Image
from test_browser import Devtools, chromium, evaluate, page_errors  # noqa: F401 (a fixture)

import imgtasks
from imgtasks import jobserver
from imgtasks.cluster import ClusterSettings
from imgtasks.contact_sheet import Tile
from imgtasks.jobfeed import HOST_SERIES, HostPoint, JobFeed, TopCounts, failure_kinds
from imgtasks.jobpage import host_limit_lines, progress_text, tile_glyphs
from imgtasks.jobserver import PATH
from imgtasks.nodes import BatchReport

# --- figures ---------------------------------------------------------------------------------


def report(batch_id: int, counts: dict[str, int], path: str = "", **fields: Any) -> BatchReport:
    return BatchReport(batch_id, path, counts, entries=sum(counts.values()), **fields)


def test_failing_hosts_and_errors_are_kept_for_the_largest_counts_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crawl fails on a new host in nearly every batch: the feed kept a count for each."""
    monkeypatch.setattr(TopCounts, "KEEP", 100)
    feed = JobFeed()
    for i in range(5000):
        failed = {f"h{i}.example": 1, "big.example": 2, "bigger.example": 3}
        errors = {f"connection_error: h{i}.example refused": 1, "timeout: read": 2}
        feed.add(report(i, {"ok": 1, "connection_error": 4, "timeout": 2}, failed_hosts=failed,
                        network_errors=errors))  # fmt: skip
    figures = feed.figures()
    assert list(figures.failed_hosts.items())[:2] == [
        ("bigger.example", 15000),
        ("big.example", 10000),
    ]
    assert list(figures.errors.items())[:2] == [
        ("connection_error", 15000),
        ("timeout: read", 10000),
    ]
    assert len(figures.failed_hosts) == len(figures.errors) == 10
    assert len(feed._hosts) <= 200 and len(feed._errors) <= 200


def test_the_feed_adds_reports_up() -> None:
    now = [0.0]
    feed = JobFeed(total=10, clock=lambda: now[0])
    now[0] = 1.0
    feed.add(
        report(
            0,
            {"ok": 3, "timeout": 1},
            bytes_in=3_000_000,
            failed_hosts={"a.example": 1},
            network_errors={"timeout: read": 1},
        )
    )
    now[0] = 2.0
    feed.add(report(1, {"ok": 2, "http_4xx": 2}, bytes_in=2_000_000, failed_hosts={"b": 2}))
    figures = feed.figures()
    assert (figures.done, figures.total, figures.ok, figures.failed) == (8, 10, 5, 3)
    assert figures.counts == {"ok": 5, "timeout": 1, "http_4xx": 2}
    assert figures.bytes_in == 5_000_000
    assert figures.failed_hosts == {"b": 2, "a.example": 1}
    assert figures.errors == {"http_4xx": 2, "timeout: read": 1}
    assert [r.t for r in figures.rates] == [1.0, 2.0]
    assert figures.rates[-1].images_per_s == pytest.approx(4.0)  # the 2nd batch, in 1 s
    assert figures.rates[-1].mb_per_s == pytest.approx(2.0)
    assert figures.fraction == pytest.approx(0.8)
    assert "8 / 10 images (80 %), 5 ok, 3 failed" in progress_text(figures)
    feed.finish()
    assert feed.figures().finished and "done" in progress_text(feed.figures())


def test_the_feed_charts_the_hosts_with_the_highest_limits() -> None:
    now = [0.0]
    feed = JobFeed(clock=lambda: now[0])
    for t in range(1, 4):
        now[0] = float(t)
        limits = {f"h{i}": (float(8 * t + i), i) for i in range(HOST_SERIES)}
        feed.add(report(t, {"ok": 1}, host_limits=limits))
    now[0] = 4.0
    feed.add(report(4, {"ok": 1}, host_limits={"low": (1.0, 1), "high": (100.0, 3)}))
    series = feed.figures().host_limits
    assert len(series) == HOST_SERIES and "high" in series and "low" not in series
    assert "h0" not in series  # the lowest peak made way for a higher one
    assert series["high"] == (HostPoint(4.0, 100.0, 3),)
    assert [p.limit for p in series["h7"]] == [15.0, 23.0, 31.0]
    lines = host_limit_lines(feed.figures())
    assert len(lines["xs"]) == len(lines["ys"]) == len(lines["host"]) == HOST_SERIES
    assert lines["ys"][lines["host"].index("high")] == [100.0]


def test_network_failures_count_once_by_their_error() -> None:
    kinds = failure_kinds(
        report(
            0,
            {"ok": 1, "timeout": 2, "decode_error": 1, "duplicate": 1},
            network_errors={"timeout: read timed out": 2},
        )
    )
    assert kinds == {"timeout: read timed out": 2, "decode_error": 1}


def jpeg(size: tuple[int, int]) -> bytes:
    import io

    out = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(out, "JPEG")
    return out.getvalue()


def test_tiles_sit_on_the_contact_sheet_grid() -> None:
    tiles = [Tile(5, "ok", jpeg((128, 64))), Tile(4, "http_4xx"), Tile(3, "ok", b"junk")]
    glyphs = tile_glyphs(tiles)
    assert len(glyphs.pictures["url"]) == 1
    assert glyphs.pictures["url"][0].startswith("data:image/jpeg;base64,")
    assert (glyphs.pictures["w"][0], glyphs.pictures["h"][0]) == (128, 64)
    assert glyphs.pictures["y"][0] == 4 + 32  # centred in its 128 px box
    assert glyphs.cells["text"] == ["", "http_4xx", "unreadable"]
    assert glyphs.cells["label"] == ["#5", "#4", "#3"]


def test_recent_tiles_read_the_newest_parts(tmp_path: Path, demo_server) -> None:
    result = imgtasks.thumbnails(
        [*demo_server.urls(6), "nope"],
        tmp_path,
        cluster="sync",
        batch_size=3,
        progress=False,
        job_page=False,
    )
    parts = sorted(p.name for p in (tmp_path / "manifest").iterdir())
    feed = JobFeed(result.output, result.run_id)
    for i, part in enumerate(parts):
        feed.add(report(i, {}, f"manifest/{part}"))
    tiles = feed.recent_tiles(5)
    assert [t.index for t in tiles] == [6, 5, 4, 3, 2]
    assert tiles[0].status == "invalid_url" and tiles[0].image is None
    assert all(t.image for t in tiles[1:])


# --- where it is served ---------------------------------------------------------------------


def test_the_page_binds_loopback_only() -> None:
    for address in ("0.0.0.0:8790", "10.1.2.3:80", "example.org:8790"):
        with pytest.raises(ValueError, match="loopback only"):
            jobserver.check_loopback(address)
    jobserver.check_loopback("127.0.0.1:0")
    jobserver.check_loopback("localhost:8790")
    with pytest.raises(ValueError, match="loopback only"):
        imgtasks.thumbnails(["http://127.0.0.1/x.jpg"], "unused", job_page="0.0.0.0:1")


def test_a_page_server_of_its_own_moves_off_a_taken_port() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        page = jobserver.serve(None, f"127.0.0.1:{port}")
        try:
            assert page.url.startswith("http://127.0.0.1:") and page.url.endswith(PATH)
            assert f":{port}/" not in page.url
            html = requests.get(page.url, timeout=10)
            assert html.status_code == 200 and 'href="imgtasks"' in html.text
            css = requests.get(page.url.replace(PATH, "/statics/css/base.css"), timeout=10)
            assert css.status_code == 200  # the dashboard's look
            assert "<iframe" in page._repr_html_()
        finally:
            page.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(page.url, timeout=5)


def test_the_cli_prints_the_page_beside_the_dashboard(tmp_path: Path) -> None:
    port = free_port()
    proc = start_flow(
        [
            "--count",
            "200",
            "--latency",
            "0.2",
            "--cpu-workers",
            "1",
            "--io-threads",
            "2",
            "--out",
            str(tmp_path),
            "--dashboard-address",
            f"127.0.0.1:{port}",
        ]
    )
    try:
        assert wait_for_dashboard(proc, port) == 200
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        assert f"job page: http://127.0.0.1:{port}/imgtasks\n" in lines, lines
        status = requests.get(f"http://127.0.0.1:{port}/status", timeout=10).text
        assert '<a href="imgtasks">Imgtasks</a>' in status  # in the dashboard's menu
        assert requests.get(f"http://127.0.0.1:{port}/imgtasks", timeout=10).status_code == 200
    finally:
        kill_tree(proc)


# --- in a browser, during a run ---------------------------------------------------------------

# What the page draws, read from BokehJS: the named data sources and the thumbnails loaded.
PAGE_FIGURES = r"""
(() => {
  const B = window.Bokeh;
  if (!B || !B.documents || !B.documents.length) return JSON.stringify({ready: false});
  const doc = B.documents[0];
  const data = (name) => { const m = doc.get_model_by_name(name); return m ? m.data : null; };
  const counts = data('imgtasks-counts-data') || {status: [], n: []};
  const pictures = doc.get_model_by_name('imgtasks-pictures');
  const view = pictures ? B.index.find_one(pictures) : null;
  const images = view && view.glyph && view.glyph.image ? view.glyph.image : [];
  const drawn = images.filter((im) => im && im.naturalWidth > 0).length;
  const progress = data('imgtasks-progress-data');
  const limits = data('imgtasks-host-limits-data') || {host: [], ys: []};
  return JSON.stringify({
    ready: true,
    progress: progress ? {done: progress.done[0], text: progress.text[0]} : null,
    counts: Object.fromEntries(Array.from(counts.status).map((s, i) => [s, counts.n[i]])),
    thumbnails: drawn,
    host_limits: Object.fromEntries(
      Array.from(limits.host).map((h, i) => [h, Array.from(limits.ys[i])])),
    menu: Array.from(document.querySelectorAll('.navbar a')).map((a) => a.textContent.trim()),
  });
})()
"""


@pytest.fixture
def slow_client(unused_port: int) -> Iterator[Client]:
    settings = ClusterSettings(
        cpu_workers=1, io_threads=2, dashboard_address=f"127.0.0.1:{unused_port}"
    )
    with imgtasks.local_cluster(settings) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture
def unused_port() -> int:
    return free_port()


async def watch(devtools: Any, url: str, until: Any, timeout: float) -> tuple[dict, str]:
    target = (await devtools.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
    attached = await devtools.send("Target.attachToTarget", {"targetId": target, "flatten": True})
    session = attached["sessionId"]
    for domain in ("Runtime", "Log", "Page"):
        await devtools.send(f"{domain}.enable", session=session)
    await devtools.send("Emulation.setDeviceMetricsOverride", METRICS, session)
    await devtools.send("Page.navigate", {"url": url}, session)
    seen: dict = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = await evaluate(devtools, session, PAGE_FIGURES)
        if until(seen):
            break
        await asyncio.sleep(0.25)
    return seen, session


METRICS = {"width": 1280, "height": 1300, "deviceScaleFactor": 1, "mobile": False}


def finished_on_page(seen: dict) -> bool:
    return "done" in (seen.get("progress") or {}).get("text", "")


@pytest.mark.timeout(240)
def test_the_page_draws_the_run_in_chromium(
    chromium: Any,  # noqa: F811 (the fixture)
    slow_client: Client,
    tmp_path: Path,
) -> None:
    from imgtasks.demo import DemoServer, ServerSettings

    with DemoServer(ServerSettings(latency=0.2, jitter=0.0)) as slow:
        urls = [*slow.urls(120), f"{slow.base_url}/status/404", "not a url"]
        demo_host = f"127.0.0.1:{slow.port}"
        finished: list[imgtasks.Result] = []
        run = threading.Thread(
            target=lambda: finished.append(
                imgtasks.thumbnails(
                    urls, tmp_path, client=slow_client, batch_size=4, window=2, progress=False
                )
            )
        )
        page = imgtasks.job_page(slow_client)  # before the run, as a notebook would
        assert page.url == slow_client.dashboard_link.replace("/status", PATH)
        run.start()

        async def go() -> tuple[dict, dict, list[str]]:
            devtools = await Devtools.connect(chromium.websocket_url())
            try:
                during, first = await watch(
                    devtools,
                    page.url,
                    lambda s: s.get("thumbnails", 0) >= 1 and sum(s.get("counts", {}).values()),
                    timeout=90,
                )
                await asyncio.to_thread(run.join, 180)
                at_end, second = await watch(
                    devtools,
                    page.url,
                    finished_on_page,
                    timeout=30,
                )
                await asyncio.sleep(1.0)  # late errors
                shot = await devtools.send("Page.captureScreenshot", {"format": "png"}, second)
                (tmp_path / "job_page.png").write_bytes(base64.b64decode(shot["data"]))
                # the first load may come before the dashboard: "starting", then the page
                errors = page_errors(devtools, first, page.url) + page_errors(devtools, second)
                return during, at_end, errors
            finally:
                devtools.close()

        during, at_end, errors = asyncio.run(go())
    assert finished, "the run did not finish"
    result = finished[0]
    assert during["thumbnails"] >= 1, during
    assert 0 < during["progress"]["done"] <= 1, during
    assert sum(during["counts"].values()) > 0, during
    assert "Imgtasks" in during["menu"] and "Status" in during["menu"], during
    # the demo host's adaptive limit, one point per batch (its URLs all on one host)
    (host, limits), *others = at_end["host_limits"].items()
    assert not others and host == demo_host, at_end["host_limits"]
    assert len(limits) >= 1 and all(limit >= 1 for limit in limits), limits
    manifest = result.manifest()
    expected = {str(k): int(v) for k, v in manifest["status"].value_counts().items()}
    assert at_end["counts"] == expected == dict(result.counts), at_end
    assert at_end["progress"]["done"] == 1, at_end
    assert f"{len(urls)} / {len(urls)} images" in at_end["progress"]["text"]
    assert result.job_page == page.url
    assert not errors, errors
