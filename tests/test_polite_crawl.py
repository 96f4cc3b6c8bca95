"""Crawling politely, against the demo server: opt-out headers, robots.txt, the rate per host
(spacing as the server saw it), error storms."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import free_port, run_flow

import imgtasks
from imgtasks import download
from imgtasks.demo import DemoServer, ServerSettings
from imgtasks.download import DownloadSettings, fetch, fetch_many
from imgtasks.politeness import RobotsCache

FAST = {"retries": 0, "deadline": 10.0}
ROBOTS = "User-agent: imgtasks\nDisallow: /img/\n\nUser-agent: *\nDisallow:\n"


@pytest.fixture
def fresh_robots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no robots.txt cached in this process."""
    monkeypatch.setattr(download, "_robots", RobotsCache())


@pytest.fixture
def server(request) -> Iterator[DemoServer]:
    options = getattr(request, "param", {})
    with DemoServer(ServerSettings(latency=0.0, jitter=0.0, **options)) as running:
        yield running


def tagged(server: DemoServer, *headers: str, index: int = 1) -> str:
    query = "&".join(f"h={quote(h)}" for h in headers)
    return f"{server.base_url}/robots-tag/{index}.jpg?{query}"


# --- X-Robots-Tag ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (("noai",), "opted_out"),
        (("noindex, nofollow",), "opted_out"),
        (("imgtasks: noimageai",), "opted_out"),
        (("otherbot: noai",), "ok"),
        (("otherbot: noai", "noimageindex"), "opted_out"),  # two headers, read one by one
        (("otherbot: noai, noindex",), "ok"),
        (("nofollow", "noarchive"), "ok"),
    ],
)
def test_opt_out_headers_keep_nothing(server: DemoServer, headers, status: str) -> None:
    result = fetch(tagged(server, *headers), DownloadSettings(**FAST))
    assert result.status == status, result.error
    assert (result.content is None) == (status == "opted_out")


def test_the_token_and_the_directives_can_be_changed(server: DemoServer) -> None:
    mine = DownloadSettings(**FAST, user_agent_token="mybot")
    assert fetch(tagged(server, "mybot: noai"), mine).status == "opted_out"
    assert fetch(tagged(server, "imgtasks: noai"), mine).status == "ok"
    off = DownloadSettings(**FAST, disallowed_header_directives=())
    assert fetch(tagged(server, "noai"), off).status == "ok"
    assert mine.user_agent_header.endswith(" mybot")  # the token is in the User-Agent


def test_an_opted_out_image_leaves_no_file(server: DemoServer, tmp_path: Path) -> None:
    urls = [tagged(server, "noai", index=1), tagged(server, "otherbot: noai", index=2)]
    result = imgtasks.thumbnails(
        urls,
        tmp_path / "out",
        cluster="sync",
        keep_originals=tmp_path / "originals",
        progress=False,
    )
    df = result.manifest().sort_values("index")
    assert list(df["status"]) == ["opted_out", "ok"]
    assert df["error"].iloc[0] == "X-Robots-Tag: noai"
    assert df["path"].iloc[0] == "" and df["original_path"].iloc[0] == ""
    assert len(list((tmp_path / "originals").rglob("*.jpg"))) == 1


def test_turning_the_check_off_warns_at_start(
    server: DemoServer, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text(tagged(server, "noai") + "\n")
    args = ["--urls", str(listing), "--out", str(tmp_path / "out"), "--scheduler", "sync"]
    proc = run_flow([*args, "--disallowed-header-directives", ""], subprocess_env)
    assert proc.returncode == 0, proc.stderr
    assert "X-Robots-Tag opt-outs are not checked" in proc.stderr
    assert "ok                             1" in proc.stdout


# --- robots.txt -------------------------------------------------------------------------------


@pytest.mark.parametrize("server", [{"robots_txt": ROBOTS}], indirect=True)
def test_robots_txt_is_asked_once_per_host_and_obeyed(server: DemoServer, fresh_robots) -> None:
    settings = DownloadSettings(**FAST, respect_robots_txt=True, per_host=4)
    urls = server.urls(12) + [f"{server.base_url}/tiny/{i}.jpg" for i in range(12)]
    results = fetch_many(urls, settings)
    assert [r.status for r in results] == ["robots_disallowed"] * 12 + ["ok"] * 12
    assert "robots.txt disallows imgtasks" in results[0].error
    assert len(server.request_log("/robots.txt")) == 1
    assert server.request_log("/img/") == []  # nothing disallowed was requested
    other = DownloadSettings(**FAST, respect_robots_txt=True, user_agent_token="otherbot")
    assert fetch(server.urls(1)[0], other).ok  # the rules name imgtasks only


def test_robots_txt_is_not_asked_unless_wanted(server: DemoServer, fresh_robots) -> None:
    assert fetch(server.urls(1)[0], DownloadSettings(**FAST)).ok
    assert server.request_log("/robots.txt") == []


@pytest.mark.parametrize(
    ("server", "status"),
    [
        ({"robots_txt": None}, "ok"),  # 404: unavailable, everything allowed
        ({"robots_txt": "gone", "robots_status": 410}, "ok"),
        ({"robots_txt": "oops", "robots_status": 503}, "robots_disallowed"),  # unreachable
        ({"robots_txt": "oops", "robots_status": 500}, "robots_disallowed"),
    ],
    indirect=["server"],
)
def test_robots_txt_errors_follow_rfc_9309(server: DemoServer, fresh_robots, status) -> None:
    result = fetch(server.urls(1)[0], DownloadSettings(**FAST, respect_robots_txt=True))
    assert result.status == status, result.error


def test_an_unreachable_robots_txt_disallows_the_host(fresh_robots) -> None:
    url = f"http://127.0.0.1:{free_port()}/img/1.jpg"  # nothing listens there
    result = fetch(url, DownloadSettings(**FAST, respect_robots_txt=True))
    assert result.status == "robots_disallowed", result.error


# --- rate per host ----------------------------------------------------------------------------


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(sorted(times))]


def test_a_burst_to_one_host_is_spaced_by_the_rate(server: DemoServer) -> None:
    """16 threads ask for 12 images of one host at once; at 20 requests/s the server sees
    them spread over at least 11 x 50 ms, and never two together. (Requests leave 50 ms
    apart; one may reach the server late and the next on time, hence the margins.)"""
    settings = DownloadSettings(**FAST, per_host_rate=20.0, parallel=16, per_host=16)
    assert all(r.ok for r in fetch_many(server.urls(12), settings))
    seen = sorted(t for t, _, _ in server.request_log("/img/"))
    assert len(seen) == 12
    assert seen[-1] - seen[0] >= 11 * 0.05 * 0.95, gaps(seen)
    assert min(gaps(seen)) >= 0.025, gaps(seen)


def test_retries_and_redirects_wait_for_the_rate_too(server: DemoServer) -> None:
    settings = DownloadSettings(retries=3, backoff=0.0, backoff_jitter=0.0, per_host_rate=10.0)
    flaky = f"{server.base_url}/flaky/rate/2/503/1.jpg"  # 503, 503, then the image
    assert fetch(flaky, settings).ok
    assert min(gaps([t for t, _, _ in server.request_log("/flaky/")])) >= 0.07
    assert fetch(f"{server.base_url}/redirect/3/2.jpg", settings).ok
    hops = [t for t, _, path in server.request_log() if path.startswith(("/redirect/", "/img/"))]
    assert len(hops) == 4 and min(gaps(hops)) >= 0.07  # three redirects, then the image


def test_each_host_keeps_its_own_spacing(server: DemoServer) -> None:
    """127.0.0.1 and localhost are two hosts; each is spaced by the rate."""
    settings = DownloadSettings(**FAST, per_host_rate=5.0, parallel=8)
    local = [u.replace("127.0.0.1", "localhost") for u in server.urls(3)]
    assert all(r.ok for r in fetch_many(server.urls(3) + local, settings))
    log = server.request_log("/img/")
    hosts = {h for _, h, _ in log}
    assert len(hosts) == 2
    for host in hosts:
        assert min(gaps([t for t, h, _ in log if h == host])) >= 0.15


# --- error storms -----------------------------------------------------------------------------


def test_an_error_storm_is_one_warning_naming_error_and_hosts(
    server: DemoServer, tmp_path: Path, caplog
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    urls = [f"{dead}/img/{i}.jpg" for i in range(150)] + server.urls(10)
    with caplog.at_level(logging.WARNING, logger="imgtasks"):
        result = imgtasks.thumbnails(
            urls,
            tmp_path / "out",
            cluster="sync",
            download=DownloadSettings(**FAST),
            progress=False,
        )
    storms = [r.getMessage() for r in caplog.records if "failed on the network" in r.getMessage()]
    assert len(storms) == 1, storms
    assert "connection_error" in storms[0] and "127.0.0.1 (" in storms[0]
    assert result.counts == {"connection_error": 150, "ok": 10}
    assert result.failed_hosts == {"127.0.0.1": 150}
    assert "failing hosts    127.0.0.1 (150)" in result.summary()


@pytest.mark.parametrize("server", [{"robots_txt": ROBOTS}], indirect=True)
def test_the_command_line_flags_reach_the_downloads(
    server: DemoServer, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    import pandas as pd

    listing = tmp_path / "urls.txt"
    tiny = [f"{server.base_url}/tiny/{i}.jpg" for i in range(4)]
    listing.write_text("\n".join([*server.urls(2), *tiny, tagged(server, "mybot: noai")]) + "\n")
    args = ["--urls", str(listing), "--out", str(tmp_path / "out"), "--scheduler", "sync"]
    args += ["--respect-robots-txt", "--per-host-rate", "10", "--user-agent-token", "mybot"]
    proc = run_flow(args, subprocess_env)
    assert proc.returncode == 0, proc.stderr
    df = pd.read_parquet(tmp_path / "out" / "manifest").sort_values("index")
    # the robots.txt rules name imgtasks, not mybot; the X-Robots-Tag names mybot
    assert list(df["status"]) == ["ok"] * 6 + ["opted_out"]
    times = [t for t, _, path in server.request_log() if not path.startswith("/robots.txt")]
    assert min(gaps(times)) >= 0.07  # 10 requests/s to this one host (less arrival jitter)
