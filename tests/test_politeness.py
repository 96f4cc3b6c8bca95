"""imgtasks.politeness on its own: header parsing, robots rules, the rate, the DNS cache."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from imgtasks.politeness import (
    DnsCache,
    RateLimiter,
    RobotsAnswer,
    RobotsCache,
    header_directives,
    opt_out,
    robots_parser,
)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (["noai"], "noai"),
        (["NoImageAI"], "noimageai"),
        (["noindex, nofollow"], "noindex"),
        (["nofollow", "noimageindex"], "noimageindex"),  # several headers
        (["imgtasks: noai"], "noai"),  # addressed to us
        (["IMGTASKS: NOAI"], "noai"),
        (["otherbot: noai"], None),  # addressed to another agent
        (["otherbot: noindex, noai"], None),  # the scope lasts to the end of the header
        (["otherbot: noai", "nofollow"], None),  # ... but not into the next header
        (["otherbot: noai", "noai"], "noai"),
        (["otherbot: nofollow, imgtasks: noai"], "noai"),
        (["unavailable_after: 25 Jun 2030 15:00:00 PST"], None),  # a valued directive
        (["max-image-preview: none, noimageai"], "noimageai"),
        (["all"], None),
        ([""], None),
        ([], None),
    ],
)
def test_opt_out_reads_headers_as_the_convention_says(
    headers: list[str], expected: str | None
) -> None:
    assert opt_out(headers) == expected


def test_directives_and_token_can_be_changed() -> None:
    assert opt_out(["mybot: noai"], token="mybot") == "noai"
    assert opt_out(["imgtasks: noai"], token="mybot") is None
    assert opt_out(["noarchive"], disallowed=["noarchive"]) == "noarchive"
    assert opt_out(["noai"], disallowed=[]) is None
    assert header_directives(["a, b", "x: c, d", "e"]) == ["a", "b", "e"]


def test_robots_rules_of_rfc_9309() -> None:
    parsed = robots_parser(
        RobotsAnswer(200, "User-agent: imgtasks\nDisallow: /private/\n\nUser-agent: *\nAllow: /\n")
    )
    assert parsed.can_fetch("imgtasks", "http://h/public/a.jpg")
    assert not parsed.can_fetch("imgtasks", "http://h/private/a.jpg")
    assert parsed.can_fetch("otherbot", "http://h/private/a.jpg")
    assert robots_parser(RobotsAnswer(404)).can_fetch("imgtasks", "http://h/x")  # unavailable
    assert robots_parser(RobotsAnswer(403)).can_fetch("imgtasks", "http://h/x")
    assert not robots_parser(RobotsAnswer(503)).can_fetch("imgtasks", "http://h/x")  # unreachable
    assert not robots_parser(RobotsAnswer(None)).can_fetch("imgtasks", "http://h/x")


def test_robots_cache_fetches_once_per_host_even_when_asked_at_once() -> None:
    cache = RobotsCache()
    fetched: list[str] = []

    def fetch(url: str) -> RobotsAnswer:
        fetched.append(url)
        time.sleep(0.05)  # concurrent askers must wait for this one fetch
        return RobotsAnswer(200, "User-agent: *\nDisallow: /no/\n")

    answers: list[bool] = []
    threads = [
        threading.Thread(
            target=lambda i=i: answers.append(
                cache.allowed("http://h:80", f"http://h/{'no' if i % 2 else 'yes'}/{i}", "t", fetch)
            )
        )
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fetched == ["http://h:80/robots.txt"]
    assert sorted(answers) == [False] * 4 + [True] * 4
    cache.allowed("http://other:80", "http://other/x", "t", fetch)
    assert fetched[-1] == "http://other:80/robots.txt"


def test_robots_cache_is_bounded() -> None:
    cache = RobotsCache(size=3)
    fetched: list[str] = []

    def fetch(url: str) -> RobotsAnswer:
        fetched.append(url)
        return RobotsAnswer(404)

    for i in range(5):
        cache.allowed(f"http://h{i}:80", f"http://h{i}/x", "t", fetch)
    cache.allowed("http://h4:80", "http://h4/y", "t", fetch)  # still cached
    cache.allowed("http://h0:80", "http://h0/y", "t", fetch)  # evicted: fetched again
    assert len(fetched) == 6


def test_rate_limiter_spaces_requests_to_one_host_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from imgtasks import politeness

    now = [100.0]  # a clock that moves only when the test says
    monkeypatch.setattr(politeness.time, "monotonic", lambda: now[0])
    limiter = RateLimiter(rate=20.0)  # one request every 50 ms
    assert [limiter.delay("a") for _ in range(4)] == pytest.approx([0.0, 0.05, 0.10, 0.15])
    assert limiter.delay("b") == 0.0  # another host: its own bucket
    now[0] += 1.0  # idle for a second: no debt, and no burst either
    assert [limiter.delay("a") for _ in range(2)] == pytest.approx([0.0, 0.05])


def test_dns_cache_resolves_each_host_once_per_ttl() -> None:
    calls: list[str] = []

    def resolve(host: str, port: int, *args: object) -> list:
        calls.append(host)
        if host == "nowhere.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port))]

    dns = DnsCache(resolve=resolve)
    assert {tuple(dns.addresses("a.example", 80)) for _ in range(100)} == {("10.1.2.3",)}
    assert calls == ["a.example"]
    for _ in range(3):  # a failure is cached too, and raised each time
        with pytest.raises(socket.gaierror):
            dns.addresses("nowhere.invalid", 80)
    assert calls == ["a.example", "nowhere.invalid"]
    dns.forget("a.example", 80)
    dns.addresses("a.example", 80)
    assert calls.count("a.example") == 2


def test_download_resolves_each_host_once_across_new_connections(
    demo_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real fetches by host name, each on a new connection: one lookup with the cache, one
    per connection without it."""
    from imgtasks import download

    lookups: list[str] = []
    real = socket.getaddrinfo

    def counting(host, *args, **kwargs):
        if host == "localhost":
            lookups.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    monkeypatch.setattr(download, "_dns", DnsCache())
    urls = [u.replace("127.0.0.1", "localhost") for u in demo_server.urls(8)]

    def fetch_each(settings: download.DownloadSettings) -> list[bool]:
        oks = []
        for url in urls:
            oks.append(download.fetch(url, settings).ok)
            download.get_session(settings).close()  # the next fetch opens a new connection
        return oks

    assert all(fetch_each(download.DownloadSettings(retries=0, per_host=3)))
    assert lookups == ["localhost"]
    lookups.clear()
    assert all(fetch_each(download.DownloadSettings(retries=0, per_host=3, dns_cache=False)))
    assert len(lookups) == len(urls)
