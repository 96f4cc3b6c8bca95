"""The adaptive per-host limit against the demo server's hosts: healthy and slow, fragile
(429 beyond K in flight), several at once on 127.0.0.2 and up. Asserts on what the server
and the limits saw (requests in flight, 429s, limits), never on wall-clock speed."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import run_flow

import imgtasks
from imgtasks import download
from imgtasks.demo import DemoServer, ServerSettings
from imgtasks.demo.load import Fragility
from imgtasks.download import DownloadSettings, fetch_many
from imgtasks.hostlimits import Snapshot
from imgtasks.keyedpool import KeyedPool


@pytest.fixture(autouse=True)
def fresh_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no per-host limits learnt in this process."""
    monkeypatch.setattr(download, "_host_limits", {})


def serve(stack: ExitStack, host: str = "127.0.0.1", **options: object) -> DemoServer:
    settings = ServerSettings(host=host, jitter=0.0, corpus="photos", **options)  # type: ignore[arg-type]
    return stack.enter_context(DemoServer(settings))


def tiny(server: DemoServer, count: int, start: int = 0) -> list[str]:
    return [f"{server.base_url}/tiny/{i}.jpg" for i in range(start, start + count)]


def limit_of(server: DemoServer, settings: DownloadSettings) -> Snapshot:
    key = ("http", server.settings.host, server.port)
    return download.host_limits(settings).snapshot()[key]


def settled(server: DemoServer, after_s: float) -> list[int]:
    """Requests in flight as each arrival saw them, ``after_s`` seconds into the run."""
    log = server.load.log()
    return [n for t, n in log if t >= log[0][0] + after_s]


@pytest.fixture
def servers() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def test_a_healthy_slow_host_gets_far_more_than_16_at_once(servers: ExitStack) -> None:
    server = serve(servers, latency=0.5)
    settings = DownloadSettings(parallel=96, retries=0)  # the default: adaptive
    results = fetch_many(tiny(server, 300), settings)
    assert all(r.ok for r in results)
    assert server.load.peak > 48  # started at 8, doubled while the host coped
    assert limit_of(server, settings).limit > 48
    assert server.load.refused == 0


def test_the_fixed_cap_stays_at_16(servers: ExitStack) -> None:
    server = serve(servers, latency=0.2)
    settings = DownloadSettings(parallel=64, retries=0, per_host_fixed=True)
    assert settings.per_host == 16
    assert all(r.ok for r in fetch_many(tiny(server, 100), settings))
    assert server.load.peak == 16


def test_a_fragile_host_is_kept_at_or_below_k(servers: ExitStack) -> None:
    server = serve(servers, latency=0.2, fragile=Fragility(4))
    settings = DownloadSettings(parallel=32)
    results = fetch_many(tiny(server, 150), settings)
    assert [r.status for r in results] == ["ok"] * 150  # the 429s were retried
    after = settled(server, 2.0)
    assert sum(n <= 4 for n in after) >= 0.9 * len(after)  # settled at K within seconds
    # few 429s: the first round trips (started at 8), then a probe now and then
    assert server.load.refused <= 0.15 * 150
    assert limit_of(server, settings).limit < 6


def test_retry_after_pauses_the_host(servers: ExitStack) -> None:
    server = serve(servers, latency=0.05, fragile=Fragility(2, retry_after=1.0))
    settings = DownloadSettings(parallel=16, per_host_start=8, backoff=0.0)
    results = fetch_many(tiny(server, 40), settings)
    assert all(r.ok for r in results)
    arrivals = [t for t, _ in server.load.log()]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) >= 0.9  # nobody asked during the Retry-After second
    assert limit_of(server, settings).cuts >= 1


def test_several_hosts_each_find_their_own_limit(servers: ExitStack) -> None:
    healthy = serve(servers, "127.0.0.2", latency=0.4)
    fragile = serve(servers, "127.0.0.3", latency=0.1, fragile=Fragility(3))
    middling = serve(servers, "127.0.0.4", latency=0.2, fragile=Fragility(12))
    lists = [tiny(healthy, 240), tiny(fragile, 60), tiny(middling, 120)]
    urls = [u for group in zip(*(lst * 4 for lst in lists), strict=False) for u in group]
    urls = list(dict.fromkeys(urls))  # interleaved, each once
    settings = DownloadSettings(parallel=160)
    results = fetch_many(urls, settings)
    assert all(r.ok for r in results), {r.status for r in results}
    assert limit_of(fragile, settings).limit < 5  # probing 4 now and then
    assert 4 < limit_of(middling, settings).limit <= 14
    assert limit_of(healthy, settings).limit > 24
    assert healthy.load.peak > 24
    assert sum(n <= 3 for n in settled(fragile, 2.0)) >= 0.85 * len(settled(fragile, 2.0))


def test_a_flow_through_a_fragile_host_makes_every_thumbnail(
    servers: ExitStack, tmp_path: Path
) -> None:
    server = serve(servers, latency=0.1, fragile=Fragility(4))
    result = imgtasks.thumbnails(
        tiny(server, 200),
        tmp_path / "out",
        cluster="hybrid",
        progress=False,
    )
    assert result.counts == {"ok": 200}
    assert server.load.refused <= 0.15 * 200
    after = settled(server, 3.0)
    assert sum(n <= 4 for n in after) >= 0.85 * len(after)


def test_the_limits_adapt_by_default_and_stay_fixed_when_asked(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    default = DownloadSettings()
    assert (default.per_host, default.per_host_start, default.per_host_fixed) == (256, 8, False)
    fixed = DownloadSettings(per_host_fixed=True)
    assert fixed.per_host == 16
    proc = run_flow(["--per-host-start", "0"], subprocess_env, timeout=60)
    assert proc.returncode == 2 and "per_host_start must be > 0" in proc.stderr, proc.stderr
    proc = run_flow(["--per-host-fixed", "--per-host-adaptive"], subprocess_env, timeout=60)
    assert proc.returncode == 2 and "not allowed with" in proc.stderr, proc.stderr


def test_keep_alive_connections_survive_more_hosts_than_threads(
    servers: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    """Each host's idle connections are kept across 20 hosts (with 16 host pools, as
    before, urllib3 closed the least recently used host's: a new connection per request)."""
    hosts = [serve(servers, f"127.0.0.{i + 2}", latency=0.0) for i in range(20)]
    urls = [url for _ in range(3) for server in hosts for url in tiny(server, 1)]
    settings = DownloadSettings(parallel=1, retries=0)  # one at a time, hosts in turn
    with caplog.at_level("DEBUG", logger="urllib3.connectionpool"):
        results = fetch_many(urls, settings)
    assert all(r.ok for r in results)
    new = [r for r in caplog.records if "Starting new HTTP connection" in r.getMessage()]
    assert len(new) == len(hosts)  # one each, reused on the second and third visit


def test_urls_waiting_for_a_slow_host_hold_no_thread_another_host_needs(
    servers: ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four threads, a slow host capped at 2 and its 12 URLs first in the batch: its
    waiting URLs queue without a thread, so the fast host's 12 all go out during the
    slow host's first round trip, not after its six."""
    monkeypatch.setattr(download, "_pool", (os.getpid(), KeyedPool(4, "test-dl")))
    slow = serve(servers, "127.0.0.2", latency=1.0)
    fast = serve(servers, "127.0.0.3", latency=0.0)
    settings = DownloadSettings(per_host=2, per_host_fixed=True, parallel=24, retries=0)
    results = fetch_many(tiny(slow, 12) + tiny(fast, 12), settings)
    assert all(r.ok for r in results)
    slow_arrivals = [t for t, _ in slow.load.log()]
    fast_arrivals = [t for t, _ in fast.load.log()]
    assert len(fast_arrivals) == 12 and slow.load.peak == 2
    assert max(fast_arrivals) < min(slow_arrivals) + 0.9  # before the slow host's second wave
    assert download._pool[1].thread_count() <= 4
