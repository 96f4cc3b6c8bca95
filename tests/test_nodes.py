from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

from imgtasks.download import DownloadSettings
from imgtasks.nodes import JobSettings, download_batch, thumbnail_batch, thumbnail_piece
from imgtasks.sinks import OutputSettings, output_relpath
from imgtasks.sources import batched, classify
from imgtasks.thumbnail import ThumbSettings

FAST = DownloadSettings(retries=0, deadline=10)


def one_batch(urls: list[str]):
    (batch,) = batched(classify(urls), len(urls))
    return batch


def job(out: Path, **kwargs) -> JobSettings:
    return JobSettings(ThumbSettings(), OutputSettings(str(out)), "testrun", **kwargs)


def test_download_node_fetches_only_pending_entries(demo_server) -> None:
    good = demo_server.urls(3)
    batch = one_batch([good[0], "not a url", good[1], good[0], good[2]])
    downloaded = download_batch(batch, FAST)
    assert [r is None for r in downloaded.results] == [False, True, False, True, False]
    assert all(r.ok and r.content for r in downloaded.results if r is not None)


def test_thumbnail_node_writes_files_and_one_row_per_entry(tmp_path: Path, demo_server) -> None:
    good = demo_server.urls(4)
    urls = [
        good[0],
        "ftp://x/y.jpg",
        f"{demo_server.base_url}/status/404",
        good[1],
        good[0],
        f"{demo_server.base_url}/html",
        good[2],
        good[3],
    ]
    downloaded = download_batch(one_batch(urls), FAST)
    report = thumbnail_batch(downloaded, job(tmp_path))
    assert report.counts == {
        "ok": 4,
        "invalid_url": 1,
        "http_4xx": 1,
        "duplicate": 1,
        "decode_error": 1,
    }
    assert report.entries == len(urls)
    # Its own thread's CPU (what batch sizes follow), never more than its wall time.
    assert 0 < report.thumbnail_cpu_s <= report.thumbnail_wall_s + 0.001  # clock resolution
    df = pd.read_parquet(tmp_path / report.manifest_path)
    assert list(df["url"]) == urls
    ok = df[df["status"] == "ok"]
    for _, row in ok.iterrows():
        assert row["path"] == output_relpath(row["url"], "jpg")
        with Image.open(tmp_path / row["path"]) as im:
            assert im.size == (row["width"], row["height"])
            assert max(im.size) == 128
        assert len(row["sha256"]) == 64 and row["bytes"] > 0
    assert df.loc[4, "path"] == df.loc[0, "path"]  # the duplicate points at the first
    assert df.loc[2, "http_status"] == 404 and "404" in df.loc[2, "error"]


def test_shard_mode_thumbnail_node_reports_its_cpu_time(tmp_path: Path, demo_server) -> None:
    downloaded = download_batch(one_batch(demo_server.urls(3)), FAST)
    report = thumbnail_piece(downloaded, job(tmp_path)).report
    assert report.counts == {"ok": 3}
    assert 0 < report.thumbnail_cpu_s <= report.thumbnail_wall_s + 0.001  # clock resolution


def test_nodes_are_idempotent(tmp_path: Path, demo_server) -> None:
    batch = one_batch(demo_server.urls(3))
    first = thumbnail_batch(download_batch(batch, FAST), job(tmp_path))
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    second = thumbnail_batch(download_batch(batch, FAST), job(tmp_path))
    assert first.manifest_path == second.manifest_path
    again = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert set(again) == set(files)
    thumbs = [p for p in files if p.suffix == ".jpg"]
    assert len(thumbs) == 3 and all(again[p] == files[p] for p in thumbs)


def test_unwritable_output_becomes_write_error(tmp_path: Path, demo_server) -> None:
    blocker = tmp_path / "out"
    blocker.mkdir()
    batch = one_batch(demo_server.urls(2))
    # make the fan-out directories impossible: a file where the first directory must go
    for url in demo_server.urls(2):
        (blocker / output_relpath(url, "jpg").split("/")[0]).write_text("in the way")
    report = thumbnail_batch(download_batch(batch, FAST), job(blocker))
    assert report.counts == {"write_error": 2}
    df = pd.read_parquet(blocker / report.manifest_path)
    assert all("cannot write" in e for e in df["error"])


def test_originals_are_kept_under_the_same_stable_names(tmp_path: Path, demo_server) -> None:
    urls = demo_server.urls(2)
    originals = tmp_path / "originals"
    report = thumbnail_batch(
        download_batch(one_batch(urls), FAST),
        job(tmp_path / "out", originals=OutputSettings(str(originals))),
    )
    df = pd.read_parquet(tmp_path / "out" / report.manifest_path)
    for _, row in df.iterrows():
        kept = originals / row["original_path"]
        assert kept.stat().st_size == row["bytes"]
        assert Path(row["original_path"]).stem == Path(row["path"]).stem
