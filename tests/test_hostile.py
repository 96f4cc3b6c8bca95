"""Hostile input against the real flow: one run, every fault route, one test per case.

The flow runs ONCE (module fixture) as a subprocess, exactly as a user runs it, over a
URL list that mixes good demo URLs with every hostile case the demo server can produce.
Each test then reads the manifest: the hostile URL got the documented status, and the
good URLs of the same run still came out right. Module-level checks: exit 0, a bounded
wall time, nothing written outside ``--out``, no partial files, every thumbnail decodes.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest
from conftest import ROOT, free_port, run_flow, thumbnail_files
from PIL import Image

from imgtasks.demo import DemoServer, ServerSettings

TIMEOUT = 4.0  # --timeout: total deadline per URL
RETRIES = 2
MAX_BYTES = 8_000_000  # above every corpus image (<= 2.7 MB), far below the 500 MB body
HUGE = 524_288_000
WALL_BOUND_S = 120.0  # sanity bound: a few deadlines + cluster start-up, not performance
GOOD_INDICES = (3, 9, 10, 16, 17, 21, 22, 25)
THUMB_NAME = re.compile(r"^[0-9a-f]{2}/([0-9a-f]{64})\.jpg$")
PART_NAME = re.compile(r"^manifest/part-[^/]+\.parquet$")
ALLOWED_TOP = {"run.log", "contact_sheet.jpg"}


def closed_port() -> int:
    """A port that was bound then closed: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Each hostile case: name -> path on the demo server (or a full URL when it starts with
# a scheme, or a literal line when it is not a URL at all).
def hostile_cases(base: str, refused_port: int) -> dict[str, str]:
    return {
        "404": f"{base}/status/404",
        "403": f"{base}/status/403",
        "410": f"{base}/status/410",
        "500": f"{base}/status/500",
        "503_twice": f"{base}/flaky/h503/2/503/4.jpg",
        "429_once": f"{base}/flaky/h429/1/429/5.jpg",
        "drip": f"{base}/drip/3.jpg?rate=1024",
        "hang": f"{base}/hang",
        "refused": f"http://127.0.0.1:{refused_port}/img/1.jpg",
        "truncated": f"{base}/truncated/3.jpg",
        "short": f"{base}/short/3.jpg",
        "html": f"{base}/html",
        "empty": f"{base}/empty",
        "mislabeled": f"{base}/mislabeled/9.jpg",
        "redirect": f"{base}/redirect/2/10.jpg",
        "loop": f"{base}/loop",
        "redirect_ftp": f"{base}/redirect-to?url={quote('ftp://127.0.0.1/x.jpg', safe='')}",
        "redirect_file": f"{base}/redirect-to?url={quote('file:///etc/passwd', safe='')}",
        "bomb": f"{base}/bomb.png",
        "huge": f"{base}/huge?bytes={HUGE}",
        "huge_no_length": f"{base}/huge?bytes={HUGE}&length=0",
        "corrupt": f"{base}/corrupt/3.jpg",
        "not_a_url": "not a url",
        "ftp": "ftp://x/y",
        "file": "file:///etc/passwd",
        "no_host": "http://",
        "unicode": f"{base}/any/ünïcödé/猫.jpg",
        "climb_encoded": f"{base}/any/..%2F..%2F..%2Fetc%2Fpasswd",
        "climb_query": f"{base}/img/1.jpg?name=../../x",
        "climb_dots": f"{base}/any/../../x.jpg",
    }


@dataclass
class HostileRun:
    server: DemoServer
    base: str
    out: Path
    proc: subprocess.CompletedProcess
    wall_s: float
    lines: list[str]
    cases: dict[str, str]
    good: list[str]
    df: pd.DataFrame
    counts: dict[str, int]
    before: dict[str, str]
    after: dict[str, str]
    root_before: set[str]
    root_after: set[str]

    def row(self, case: str) -> pd.Series:
        rows = self.df[self.df["url"] == self.cases[case]]
        assert len(rows) == 1, (case, rows)
        return rows.iloc[0]

    def requests_to(self, path_and_query: str) -> int:
        return self.counts.get(path_and_query, 0)


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or '<dir>') of everything under ``root``."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            found[os.path.relpath(os.path.join(dirpath, d), root)] = "<dir>"
        for f in filenames:
            path = os.path.join(dirpath, f)
            if os.path.islink(path):
                found[os.path.relpath(path, root)] = "<link>"
                continue
            with open(path, "rb") as fh:
                found[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return found


def top_level(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileRun]:
    work = tmp_path_factory.mktemp("hostile")
    basetemp = tmp_path_factory.getbasetemp()
    with DemoServer(ServerSettings(latency=0.0, jitter=0.0)) as server:
        base = server.base_url
        cases = hostile_cases(base, closed_port())
        good = [f"{base}/img/{i}.jpg" for i in GOOD_INDICES]
        # Good URLs interleaved with the hostile ones, plus a duplicate of the first good.
        lines: list[str] = []
        hostile_lines = list(cases.values())
        for i, url in enumerate(hostile_lines):
            if i % 4 == 0 and i // 4 < len(good):
                lines.append(good[i // 4])
            lines.append(url)
        lines += [g for g in good if g not in lines]
        cases["duplicate"] = good[0]
        lines.append(good[0])
        listing = work / "urls.txt"
        listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out = work / "out"
        before = tree(basetemp)
        root_before = top_level(ROOT)
        args = [
            "--urls",
            str(listing),
            "--out",
            str(out),
            "--scheduler",
            "threads",
            "--cpu-workers",
            "1",
            "--dashboard-address",
            f"127.0.0.1:{free_port()}",
            "--timeout",
            str(TIMEOUT),
            "--retries",
            str(RETRIES),
            "--max-bytes",
            str(MAX_BYTES),
            "--batch-size",
            "8",
            # Every case is on one host, several hold a slot to the deadline, and the
            # adaptive limit shrinks on their timeouts: URLs would wait for a slot, and the
            # deadline counts that wait while download_s does not. A cap above the run's
            # URL count keeps these rows about the responses; test_adaptive covers limits.
            "--per-host-fixed",
            "--per-host",
            "64",
        ]
        started = time.monotonic()
        # cwd = the work dir: a relative path escaping --out would land in the snapshot.
        proc = run_flow(args, cwd=work)
        wall = time.monotonic() - started
        counts = server.request_counts()
        after = tree(basetemp)
        df = pd.DataFrame()
        if (out / "manifest").is_dir():
            df = pd.read_parquet(out / "manifest").sort_values("index").reset_index(drop=True)
        yield HostileRun(
            server=server,
            base=base,
            out=out,
            proc=proc,
            wall_s=wall,
            lines=lines,
            cases=cases,
            good=good,
            df=df,
            counts=counts,
            before=before,
            after=after,
            root_before=root_before,
            root_after=top_level(ROOT),
        )


def assert_good_ok(run: HostileRun) -> None:
    """The good URLs of the run came out right: ok, a decodable thumbnail of the right size."""
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    rows = run.df[run.df["url"].isin(run.good) & (run.df["status"] != "duplicate")]
    assert sorted(rows["url"]) == sorted(run.good)
    assert (rows["status"] == "ok").all(), rows[["url", "status", "error"]]
    for row in rows.itertuples():
        assert 0 < row.width <= 128 and 0 < row.height <= 128
        with Image.open(run.out / row.path) as im:
            assert im.size == (row.width, row.height)


def status_of(run: HostileRun, case: str) -> str:
    assert_good_ok(run)
    return str(run.row(case)["status"])


# --------------------------------------------------------------------------- the run itself


def test_run_exits_0_within_bound_with_one_row_per_line(hostile: HostileRun) -> None:
    assert hostile.proc.returncode == 0, hostile.proc.stderr[-3000:]
    assert "Traceback" not in hostile.proc.stderr, hostile.proc.stderr[-3000:]
    assert hostile.wall_s < WALL_BOUND_S
    assert list(hostile.df["index"]) == list(range(len(hostile.lines)))
    assert list(hostile.df["url"]) == hostile.lines
    assert_good_ok(hostile)


def test_summary_counts_match_the_manifest(hostile: HostileRun) -> None:
    assert_good_ok(hostile)
    for status, n in hostile.df["status"].value_counts().items():
        assert re.search(rf"^{status}\s+{n}$", hostile.proc.stdout, re.M), (status, n)


def test_nothing_written_outside_out(hostile: HostileRun) -> None:
    assert_good_ok(hostile)
    prefix = os.path.relpath(hostile.out, hostile.out.parent.parent)  # hostile0/out
    added = {p for p in hostile.after if p not in hostile.before}
    changed = {p for p in hostile.before if hostile.after.get(p) != hostile.before[p]}
    outside = {p for p in added | changed if not (p == prefix or p.startswith(prefix + os.sep))}
    assert outside == set()
    assert hostile.root_after == hostile.root_before
    assert not Path("/etc/x.jpg").exists() and not (ROOT / "x").exists()


def test_only_expected_files_under_out(hostile: HostileRun) -> None:
    assert_good_ok(hostile)
    for path in hostile.out.rglob("*"):
        if path.is_dir():
            continue
        rel = path.relative_to(hostile.out).as_posix()
        assert not path.is_symlink(), rel
        assert rel in ALLOWED_TOP or PART_NAME.match(rel) or THUMB_NAME.match(rel), rel
        thumb = THUMB_NAME.match(rel)
        if thumb:  # named after the hash of a URL of the list, never its path
            assert rel.split("/")[0] == thumb[1][:2]


def test_no_partial_files_and_every_thumbnail_decodes(hostile: HostileRun) -> None:
    assert_good_ok(hostile)
    assert [p for p in hostile.out.rglob(".tmp-*")] == []
    thumbs = [hostile.out / rel for rel in thumbnail_files(hostile.out)]
    ok = hostile.df[hostile.df["status"] == "ok"]
    assert {p.relative_to(hostile.out).as_posix() for p in thumbs} == set(ok["path"])
    for p in thumbs:
        with Image.open(p) as im:
            im.load()
            assert im.format == "JPEG" and max(im.size) <= 128


def test_failed_rows_have_no_file_and_an_error(hostile: HostileRun) -> None:
    assert_good_ok(hostile)
    failed = hostile.df[~hostile.df["status"].isin(["ok", "duplicate"])]
    assert len(failed) >= 20
    assert (failed["path"] == "").all()
    assert (failed["error"].str.len() > 0).all()


# --------------------------------------------------------------------------- HTTP statuses


@pytest.mark.parametrize("code", [404, 403, 410])
def test_client_errors_are_http_4xx_without_retry(hostile: HostileRun, code: int) -> None:
    assert status_of(hostile, str(code)) == "http_4xx"
    assert hostile.row(str(code))["http_status"] == code
    assert hostile.requests_to(f"/status/{code}") == 1


def test_500_is_http_5xx_after_retries(hostile: HostileRun) -> None:
    assert status_of(hostile, "500") == "http_5xx"
    assert hostile.row("500")["http_status"] == 500
    assert hostile.requests_to("/status/500") == RETRIES + 1


def test_503_twice_then_ok(hostile: HostileRun) -> None:
    assert status_of(hostile, "503_twice") == "ok"
    assert hostile.requests_to("/flaky/h503/2/503/4.jpg") == 3
    assert hostile.row("503_twice")["http_status"] == 200


def test_429_with_retry_after_then_ok(hostile: HostileRun) -> None:
    row = hostile.row("429_once")
    assert status_of(hostile, "429_once") == "ok"
    assert hostile.requests_to("/flaky/h429/1/429/5.jpg") == 2
    assert row["download_s"] >= 0.9  # Retry-After: 1 was honoured


# --------------------------------------------------------------------------- time-outs


def test_drip_ends_as_timeout_at_the_deadline(hostile: HostileRun) -> None:
    row = hostile.row("drip")
    assert status_of(hostile, "drip") == "timeout"
    assert "deadline" in row["error"]
    assert TIMEOUT - 0.1 <= row["download_s"] <= TIMEOUT + 1.5


def test_hang_is_timeout(hostile: HostileRun) -> None:
    row = hostile.row("hang")
    assert status_of(hostile, "hang") == "timeout"
    assert row["download_s"] <= TIMEOUT + 1.5
    assert hostile.requests_to("/hang") == 1  # a read timeout is never replayed


def test_connection_refused_is_connection_error(hostile: HostileRun) -> None:
    row = hostile.row("refused")
    assert status_of(hostile, "refused") == "connection_error"
    assert row["http_status"] == 0
    assert row["download_s"] <= TIMEOUT + 1.5


# --------------------------------------------------------------------------- bodies


def test_truncated_body_with_honest_length_is_truncated_image(hostile: HostileRun) -> None:
    assert status_of(hostile, "truncated") == "truncated_image"
    assert hostile.row("truncated")["bytes"] > 0  # the body arrived whole; the image did not


def test_connection_closed_before_content_length_is_incomplete_body(
    hostile: HostileRun,
) -> None:
    assert status_of(hostile, "short") == "incomplete_body"


def test_html_with_200_is_decode_error(hostile: HostileRun) -> None:
    row = hostile.row("html")
    assert status_of(hostile, "html") == "decode_error"
    assert row["http_status"] == 200


def test_empty_200_is_empty_body(hostile: HostileRun) -> None:
    assert status_of(hostile, "empty") == "empty_body"


def test_jpeg_served_as_text_plain_is_decoded_by_content(hostile: HostileRun) -> None:
    row = hostile.row("mislabeled")
    assert status_of(hostile, "mislabeled") == "ok"
    assert row["source_format"] == "JPEG"


def test_corrupt_jpeg(hostile: HostileRun) -> None:
    # corrupt_jpeg() breaks every Huffman table: libjpeg reports "broken data stream",
    # which imgtasks.thumbnail maps (_TRUNCATION_HINTS) to truncated_image.
    row = hostile.row("corrupt")
    assert status_of(hostile, "corrupt") == "truncated_image"
    assert row["source_format"] == "JPEG" and row["orig_width"] > 0


def test_decompression_bomb_is_too_many_pixels(hostile: HostileRun) -> None:
    row = hostile.row("bomb")
    assert status_of(hostile, "bomb") == "too_many_pixels"
    assert (row["orig_width"], row["orig_height"], row["source_format"]) == (20000, 20000, "PNG")
    assert row["thumbnail_s"] < 1.0  # refused from the header, nothing decoded


def test_500_mb_body_refused_up_front(hostile: HostileRun) -> None:
    row = hostile.row("huge")
    assert status_of(hostile, "huge") == "too_large"
    assert "Content-Length" in row["error"]
    assert row["download_s"] < 2.0


def test_500_mb_body_without_length_cut_while_streaming(hostile: HostileRun) -> None:
    row = hostile.row("huge_no_length")
    assert status_of(hostile, "huge_no_length") == "too_large"
    assert "exceeded" in row["error"]
    assert row["download_s"] < TIMEOUT


# --------------------------------------------------------------------------- redirects


def test_redirect_to_an_image_is_ok(hostile: HostileRun) -> None:
    assert status_of(hostile, "redirect") == "ok"
    assert hostile.requests_to("/redirect/2/10.jpg") == 1
    assert hostile.requests_to("/img/10.jpg") >= 1


def test_redirect_loop_is_too_many_redirects(hostile: HostileRun) -> None:
    assert status_of(hostile, "loop") == "too_many_redirects"
    assert hostile.requests_to("/loop") <= 6


@pytest.mark.parametrize("case", ["redirect_ftp", "redirect_file"])
def test_redirect_to_non_http_scheme_is_invalid_url(hostile: HostileRun, case: str) -> None:
    row = hostile.row(case)
    assert status_of(hostile, case) == "invalid_url"
    assert "redirect" in row["error"]


# --------------------------------------------------------------------------- URL strings


@pytest.mark.parametrize("case", ["not_a_url", "ftp", "file", "no_host"])
def test_invalid_url_strings(hostile: HostileRun, case: str) -> None:
    row = hostile.row(case)
    assert status_of(hostile, case) == "invalid_url"
    assert row["error"] and row["path"] == "" and row["http_status"] == 0


def test_duplicate_points_at_first_occurrence(hostile: HostileRun) -> None:
    url = hostile.cases["duplicate"]
    rows = hostile.df[hostile.df["url"] == url]
    assert_good_ok(hostile)
    assert list(rows["status"]) == ["ok", "duplicate"]
    assert rows.iloc[1]["path"] == rows.iloc[0]["path"] != ""
    assert hostile.requests_to(url.removeprefix(hostile.base)) == 1


def test_unicode_path_is_ok(hostile: HostileRun) -> None:
    row = hostile.row("unicode")
    assert status_of(hostile, "unicode") == "ok"
    assert THUMB_NAME.match(row["path"])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("climb_encoded", "ok"),  # %2F stays encoded: one path segment, served by /any/
        ("climb_query", "ok"),  # the query never names a file
        ("climb_dots", "http_4xx"),  # the client removes dot segments: GET /x.jpg -> 404
    ],
)
def test_urls_trying_to_climb_out_stay_inside(
    hostile: HostileRun, case: str, expected: str
) -> None:
    row = hostile.row(case)
    assert status_of(hostile, case) == expected
    if expected == "ok":
        digest = hashlib.sha256(hostile.cases[case].encode()).hexdigest()
        assert row["path"] == f"{digest[:2]}/{digest}.jpg"
        assert (hostile.out / row["path"]).resolve().is_relative_to(hostile.out.resolve())
