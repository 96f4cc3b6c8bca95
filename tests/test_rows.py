"""Every input line gets exactly one manifest row, whatever happens to its URL or its batch."""

from __future__ import annotations

import dataclasses
import struct
import zlib
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgtasks import nodes
from imgtasks.download import DownloadSettings
from imgtasks.manifest import (
    MANIFEST_SCHEMA,
    Record,
    manifest_row,
    read_manifest,
    write_manifest_part,
)
from imgtasks.nodes import JobSettings, download_batch, record_failed_batch, thumbnail_batch
from imgtasks.sinks import OutputSettings
from imgtasks.sources import batched, classify
from imgtasks.thumbnail import ThumbSettings, make_thumbnail

FAST = DownloadSettings(retries=0, deadline=10)
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def one_batch(urls: list[str]):
    (batch,) = batched(classify(urls), len(urls))
    return batch


def job(out: Path) -> JobSettings:
    return JobSettings(ThumbSettings(), OutputSettings(str(out)), "rowtest")


def rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "manifest").sort_values("index").reset_index(drop=True)


# --- one URL's failure stays that URL's ---------------------------------------------------


def test_a_thumbnail_step_that_raises_costs_only_its_url(
    tmp_path: Path, demo_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = demo_server.urls(6)
    poisoned = urls[2]
    downloaded = download_batch(one_batch(urls), FAST)
    real = nodes.make_thumbnail
    bodies = {r.content: u for u, r in zip(urls, downloaded.results, strict=True)}

    def make(content: bytes, settings: ThumbSettings):
        if bodies.get(content) == poisoned:
            raise RuntimeError("boom in the thumbnail step")
        return real(content, settings)

    monkeypatch.setattr(nodes, "make_thumbnail", make)
    report = thumbnail_batch(downloaded, job(tmp_path))
    df = rows(tmp_path)
    assert list(df["url"]) == urls
    assert report.counts == {"ok": 5, "internal_error": 1}
    bad = df[df["url"] == poisoned].iloc[0]
    assert bad["status"] == "internal_error"
    assert bad["error"] == "RuntimeError: boom in the thumbnail step"
    assert (df[df["url"] != poisoned]["status"] == "ok").all()


def test_a_write_that_raises_an_unexpected_error_costs_only_its_url(
    tmp_path: Path, demo_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = demo_server.urls(4)
    downloaded = download_batch(one_batch(urls), FAST)
    real = nodes.write_file
    calls = []

    def write(settings, relpath, data):
        calls.append(relpath)
        if len(calls) == 2:  # the second thumbnail of the batch
            raise TypeError("a bug in a store driver")
        return real(settings, relpath, data)

    monkeypatch.setattr(nodes, "write_file", write)
    thumbnail_batch(downloaded, job(tmp_path))
    df = rows(tmp_path)
    assert list(df["url"]) == urls
    assert sorted(df["status"]) == ["internal_error", "ok", "ok", "ok"]
    assert "TypeError: a bug in a store driver" in set(df["error"])


# --- values from files fit the schema -------------------------------------------------------


def bmp_header(width: int, height: int) -> bytes:
    """A BMP whose header claims ``width`` x ``height`` (signed 32-bit fields), no pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (unsigned 32-bit fields)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


@pytest.mark.parametrize(
    "data",
    [
        bmp_header(INT32_MAX, INT32_MAX),
        bmp_header(INT32_MAX, -(2**31)),
        bmp_header(-(2**31), 1),
        bmp_header(0, 0),
        png_header(2**32 - 1, 2**32 - 1),
        png_header(INT32_MAX, 1),
    ],
    ids=["bmp-max", "bmp-min-height", "bmp-min-width", "bmp-zero", "png-u32-max", "png-i32-max"],
)
def test_headers_at_the_integer_limits_get_their_row(
    tmp_path: Path, demo_server, data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = demo_server.urls(3)
    downloaded = download_batch(one_batch(urls), FAST)
    hostile = dataclasses.replace(downloaded.results[1], content=data)
    results = (downloaded.results[0], hostile, downloaded.results[2])
    downloaded = dataclasses.replace(downloaded, results=results)
    thumbnail_batch(downloaded, job(tmp_path))
    df = rows(tmp_path)
    assert list(df["url"]) == urls
    assert list(df["status"])[0::2] == ["ok", "ok"]
    thumb = make_thumbnail(data)
    row = df.iloc[1]
    assert row["status"] == thumb.status != "ok"
    assert (row["orig_width"], row["orig_height"]) == (thumb.orig_width, thumb.orig_height)


def test_a_size_past_int32_is_kept_exactly_and_one_past_int64_is_clamped(tmp_path: Path) -> None:
    out = OutputSettings(str(tmp_path))
    records = [
        Record(0, "http://a/0", "too_many_pixels", orig_width=4294967169, orig_height=1),
        Record(1, "http://a/1", "too_many_pixels", orig_width=2**70, width=2**40, bytes=-(2**80)),
    ]
    write_manifest_part(out, "r", 0, records)
    df = rows(tmp_path)
    assert list(df["orig_width"]) == [4294967169, INT64_MAX]
    assert list(df["width"]) == [0, INT32_MAX]
    assert list(df["bytes"]) == [0, -(2**63)]


_INT = st.one_of(
    st.integers(),
    st.sampled_from([2**31, -(2**31) - 1, 2**32 - 1, 2**63, -(2**63) - 1, 2**64]),
)
_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40) | st.sampled_from(
    ["\x00", "a\x00b", "\ud800", "x\udfffy", "\udc80" * 3, "é" * 5000]
)
_FLOAT = st.floats(allow_nan=True, allow_infinity=True)


def _value(kind: pa.DataType) -> st.SearchStrategy:
    if pa.types.is_integer(kind):
        return _INT | st.none() | st.just("12") | st.just(float("nan"))
    if pa.types.is_floating(kind):
        return _FLOAT | _INT | st.none()
    return _TEXT | st.none() | _INT


_RECORDS = st.lists(
    st.fixed_dictionaries({c.name: _value(c.type) for c in MANIFEST_SCHEMA}),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=_RECORDS)
def test_any_field_values_are_written_and_read_back(tmp_path_factory, fields: list[dict]) -> None:
    out = OutputSettings(str(tmp_path_factory.mktemp("m")))
    records = [Record(**f) for f in fields]
    write_manifest_part(out, "run", 7, records)
    back = read_manifest(out).to_pylist()
    assert len(back) == len(records)
    for record, row in zip(records, back, strict=True):
        expected = manifest_row(record)
        for column in MANIFEST_SCHEMA:
            got, want = row[column.name], expected[column.name]
            if isinstance(want, float) and want != want:  # NaN
                assert got != got
            else:
                assert got == want, column.name
        for column in MANIFEST_SCHEMA:
            value = getattr(record, column.name)
            if pa.types.is_string(column.type) and isinstance(value, str) and value.isprintable():
                keep = None if column.name == "url" else 4096  # URLs are kept whole
                assert row[column.name] == value[:keep]  # ordinary text is never altered


# --- a node that fails every attempt ---------------------------------------------------------


def test_the_rows_of_a_failed_batch_are_written_by_the_client(tmp_path: Path, demo_server) -> None:
    good = demo_server.urls(3)
    batch = one_batch([good[0], "ftp://x/y.jpg", good[1], good[0], good[2]])
    report = record_failed_batch(batch, "KilledWorker: gone", job(tmp_path))
    df = rows(tmp_path)
    assert list(df["status"]) == [
        "batch_failed",
        "invalid_url",
        "batch_failed",
        "duplicate",
        "batch_failed",
    ]
    assert set(df[df["status"] == "batch_failed"]["error"]) == {"KilledWorker: gone"}
    assert report.counts == {"batch_failed": 3, "invalid_url": 1, "duplicate": 1}
    assert report.manifest_path.startswith("manifest/part-rowtest-")


def test_a_node_failing_every_attempt_still_gives_every_url_a_row_and_resume_retries_it(
    tmp_path: Path, demo_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real distributed run (one worker process): batch 1's thumbnail node raises on
    every attempt; Dask's retries run out; the client writes the batch's rows."""
    import imgtasks
    from imgtasks import flow
    from imgtasks.cluster import ClusterSettings

    urls = demo_server.urls(20)
    out = tmp_path / "out"
    cluster = ClusterSettings("processes", cpu_workers=1, dashboard_address="127.0.0.1:0")
    real = flow.thumbnail_batch

    def poisoned(downloaded, job, previous=None):
        if downloaded.batch.batch_id == 1:
            raise OSError("the store refuses this batch")
        return real(downloaded, job, previous)

    monkeypatch.setattr(flow, "thumbnail_batch", poisoned)  # pickled by value to the worker
    result = imgtasks.thumbnails(urls, out, cluster=cluster, batch_size=5, progress=False)
    assert len(result.failed_batches) == 1 and "FAILED batches   1" in result.summary()
    assert result.counts == {"ok": 15, "batch_failed": 5}
    df = rows(out)
    assert sorted(df["url"]) == sorted(urls)
    failed = df[df["status"] == "batch_failed"]
    assert sorted(failed["url"]) == sorted(urls[5:10])
    assert set(failed["error"]) == {"OSError: the store refuses this batch"}
    assert (df[df["status"] != "batch_failed"]["status"] == "ok").all()

    monkeypatch.setattr(flow, "thumbnail_batch", real)
    again = imgtasks.thumbnails(urls, out, cluster=cluster, resume=True, progress=False)
    assert again.counts == {"ok": 20} and again.resumed == 15 and not again.failed_batches
    df = rows(out)
    assert sorted(df["url"]) == sorted(urls)
    assert (df["status"] == "ok").all()
