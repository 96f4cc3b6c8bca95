"""Shards for training: webdataset tars and parquet files, written and read back as data
loaders read img2dataset's, on local disk and S3, resumed shard by shard, killed mid-shard."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import kill_tree
from PIL import Image
from test_resume import slow_server, start_flow  # noqa: F401 (a fixture)
from test_s3 import BUCKET, S3, run_flow, s3  # noqa: F401 (a fixture)

import imgtasks
from imgtasks.cluster import ClusterSettings
from imgtasks.shards import ShardSettings
from imgtasks.sources import batched, classify

SHARD = 8  # lines per shard in these tests: 3 shards for 20 lines


def input_frame(demo_server, n: int = 20) -> pd.DataFrame:
    urls = demo_server.urls(n)
    urls[5] = "not a url"
    urls[13] = f"{demo_server.base_url}/status/404"
    return pd.DataFrame(
        {
            "url": urls,
            "caption": [f"picture {i}" for i in range(n)],
            "similarity": [i / 100 for i in range(n)],
            "license": ["cc-by" if i % 3 else "?" for i in range(n)],
        }
    )


def shards_run(frame: pd.DataFrame, out: Path, **options) -> imgtasks.Result:
    defaults = {"cluster": "sync", "shard_size": SHARD, "batch_size": 3, "progress": False}
    return imgtasks.thumbnails(
        frame,
        out,
        caption_column="caption",
        keep_columns=["similarity", "license"],
        **(defaults | options),
    )


def shard_rows(out: Path) -> pd.DataFrame:
    """Every shard's parquet, read as NeMo Curator and pandas users read them."""
    tables = [pq.read_table(p).to_pandas() for p in sorted(out.glob("[0-9]*.parquet"))]
    return pd.concat(tables).sort_values("index").reset_index(drop=True)


def check_rows(out: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Every input line in exactly one shard's parquet, with its status and columns."""
    rows = shard_rows(out)
    assert list(rows["url"]) == list(frame["url"]) and rows["index"].is_unique
    assert list(rows["caption"]) == list(frame["caption"])
    assert list(rows["similarity"]) == list(frame["similarity"])
    assert list(rows["license"]) == list(frame["license"])
    # img2dataset's vocabulary in `status`, ours beside it: filters written for its datasets work
    assert rows.loc[5, "imgtasks_status"] == "invalid_url"
    assert rows.loc[13, "imgtasks_status"] == "http_4xx"
    assert list(rows.loc[[5, 13], "status"]) == ["failed_to_download"] * 2
    assert rows.loc[13, "error_message"] and rows.loc[13, "original_width"] == 0
    assert (rows.drop(index=[5, 13])["imgtasks_status"] == "ok").all()
    assert (rows.drop(index=[5, 13])["status"] == "success").all()
    assert (rows.drop(index=[5, 13])["original_width"] > 0).all()
    assert list(rows["key"]) == [f"{i // SHARD * 10 + i % SHARD:06d}" for i in range(len(frame))]
    for shard in range(3):
        stats = json.loads((out / f"{shard:05d}_stats.json").read_text())
        ids = rows[rows["index"] // SHARD == shard]
        ours = dict(ids["imgtasks_status"].value_counts())
        assert stats["count"] == len(ids) and stats["counts"] == ours
        peers = ids["status"].value_counts()
        assert stats["successes"] == peers.get("success", 0)
        assert stats["failed_to_download"] == peers.get("failed_to_download", 0)
        assert stats["failed_to_resize"] == 0
        assert sum(stats["status_dict"].values()) == len(ids)
        assert stats["end_time"] >= stats["start_time"]
    assert not list(out.rglob(".tmp-*")) and not (out / "manifest").exists()
    return rows


def test_keys_and_batches_follow_img2dataset() -> None:
    assert ShardSettings(size=10_000).key(10_005) == "000010005"  # shard 1, row 5
    assert ShardSettings(size=10_000).key(5) == "000000005"
    assert ShardSettings(size=1000).key(2999) == "00002999"
    urls = [f"http://h/{i}" for i in range(30)]
    for batch in batched(classify(urls), 4, shard_size=SHARD):
        assert len({e.index // SHARD for e in batch.entries}) == 1  # no batch spans two shards


def test_webdataset_shards_read_back_with_webdataset_and_tarfile(
    tmp_path: Path, demo_server
) -> None:
    import webdataset as wds

    frame = input_frame(demo_server)
    result = shards_run(frame, tmp_path / "out", output_format="webdataset")
    out = tmp_path / "out"
    assert result.counts == {"ok": 18, "invalid_url": 1, "http_4xx": 1}
    rows = check_rows(out, frame)
    view = rows.drop(columns=["status"]).rename(  # the manifest's own names and statuses
        columns={"imgtasks_status": "status", "error_message": "error"}
        | {"original_width": "orig_width", "original_height": "orig_height"}
    )
    manifest = result.manifest().sort_values("index").reset_index(drop=True)
    pd.testing.assert_frame_equal(manifest, view)
    assert list(manifest["status"]).count("ok") == 18

    tars = sorted(str(p) for p in out.glob("*.tar"))
    assert [Path(t).name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    samples = list(
        wds.WebDataset(tars, shardshuffle=False)
        .decode("pil")
        .to_tuple("__key__", "jpg", "txt", "json")
    )
    ok = rows[rows["status"] == "success"]
    assert [key for key, *_ in samples] == list(ok["key"])
    for key, image, text, meta in samples:
        assert isinstance(image, Image.Image) and max(image.size) <= 128
        assert meta["key"] == key and meta["caption"] == text
        assert (meta["width"], meta["height"]) == image.size and len(meta["phash"]) == 16
        assert meta["license"] in ("cc-by", "?") and isinstance(meta["similarity"], float)
        assert (meta["status"], meta["imgtasks_status"]) == ("success", "ok")
        assert meta["original_width"] > 0 and meta["error_message"] == ""

    with tarfile.open(tars[1]) as tar:  # plain tarfile: the members side by side, in key order
        names = tar.getnames()
        first = ok[ok["index"] // SHARD == 1].iloc[0]
        assert names[:3] == [f"{first['key']}.{ext}" for ext in ("jpg", "json", "txt")]
        assert tar.extractfile(names[0]).read()[:2] == b"\xff\xd8"


def test_parquet_shards_hold_the_images_beside_the_metadata(tmp_path: Path, demo_server) -> None:
    frame = input_frame(demo_server)
    threads = ClusterSettings("threads", dashboard_address="127.0.0.1:0")  # no port taken
    result = shards_run(frame, tmp_path / "out", output_format="parquet", cluster=threads)
    out = tmp_path / "out"
    rows = check_rows(out, frame)
    assert not list(out.glob("*.tar")) and "jpg" not in result.manifest().columns
    for image, status, width in zip(rows["jpg"], rows["status"], rows["width"], strict=True):
        if status != "success":
            assert image is None
            continue
        with Image.open(io.BytesIO(image)) as im:
            assert im.format == "JPEG" and im.width == width


def image_requests(demo_server) -> dict[str, int]:
    return {p: n for p, n in demo_server.request_counts().items() if p.startswith("/img/")}


def test_resume_skips_finished_shards_without_a_request_and_redoes_an_unfinished_one(
    tmp_path: Path, demo_server
) -> None:
    frame = input_frame(demo_server)
    out = tmp_path / "out"
    shards_run(frame, out, output_format="webdataset")
    demo_server.reset_counts()
    again = shards_run(frame, out, output_format="webdataset", resume=True)
    assert image_requests(demo_server) == {} and again.entries == 20 and again.resumed == 18
    assert again.counts == {"ok": 18, "invalid_url": 1, "http_4xx": 1}

    (out / "00001_stats.json").unlink()  # as a run killed while writing shard 1 leaves it
    (out / "00001.tar").write_bytes(b"truncated")
    demo_server.reset_counts()
    shards_run(frame, out, output_format="webdataset", resume=True)
    fetched = {demo_server.base_url + p for p in image_requests(demo_server)}
    assert fetched == set(frame["url"][SHARD : 2 * SHARD]) - {frame["url"][13]}
    check_rows(out, frame)
    with tarfile.open(out / "00001.tar") as tar:
        assert len(tar.getnames()) == 3 * 7  # shard 1 whole again: 7 samples (one 404)


def test_a_batch_failing_every_retry_is_rows_of_an_unfinished_shard_that_resume_redoes(
    tmp_path: Path, demo_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgtasks import flow

    frame = input_frame(demo_server)
    out = tmp_path / "out"
    cluster = ClusterSettings("processes", cpu_workers=1, dashboard_address="127.0.0.1:0")
    real = flow.thumbnail_piece

    def poisoned(downloaded, job):
        if downloaded.batch.batch_id == 3:  # lines 8-10: the first batch of shard 1
            raise OSError("the worker keeps dying")
        return real(downloaded, job)

    monkeypatch.setattr(flow, "thumbnail_piece", poisoned)  # pickled by value to the worker
    result = shards_run(frame, out, output_format="webdataset", cluster=cluster)
    assert len(result.failed_batches) == 1 and result.counts["batch_failed"] == 3
    rows = pd.read_parquet(out / "00001.parquet")
    assert list(rows["imgtasks_status"][:3]) == ["batch_failed"] * 3 and len(rows) == SHARD
    assert not (out / "00001_stats.json").exists()  # unfinished

    monkeypatch.setattr(flow, "thumbnail_piece", real)
    demo_server.reset_counts()
    again = shards_run(frame, out, output_format="webdataset", cluster=cluster, resume=True)
    assert not again.failed_batches and len(image_requests(demo_server)) == SHARD - 1
    check_rows(out, frame)


def test_shards_on_s3(s3: S3, demo_server, tmp_path: Path) -> None:  # noqa: F811
    frame = input_frame(demo_server)
    listing = tmp_path / "urls.csv"
    frame.to_csv(listing, index=False)
    prefix = f"{BUCKET}/shards"
    args = [
        *("--urls", str(listing), "--out", f"s3://{prefix}"),
        *("--storage-options", json.dumps(s3.options), "--output-format", "webdataset"),
        *("--shard-size", str(SHARD), "--caption-column", "caption"),
        *("--keep-columns", "similarity,license"),
    ]
    proc = run_flow(args, s3.env(), tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    local = tmp_path / "copy"
    s3.fs().get(f"{prefix}/", str(local), recursive=True)
    rows = check_rows(local, frame.astype({"similarity": str}))  # csv: kept as text
    assert sorted(p.name for p in local.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(rows) == 20


@pytest.mark.timeout(300)
def test_a_run_killed_mid_shard_leaves_whole_shards_and_resume_completes_it(
    tmp_path: Path,
    slow_server,  # noqa: F811
) -> None:
    n, size = 96, 16
    frame = pd.DataFrame({"url": slow_server.urls(n), "caption": [f"c{i}" for i in range(n)]})
    listing = tmp_path / "urls.csv"
    frame.to_csv(listing, index=False)
    out = tmp_path / "out"
    shard_args = ("--output-format", "webdataset", "--shard-size", str(size))
    shard_args += ("--caption-column", "caption")
    first = start_flow(listing, out, *shard_args)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*_stats.json")):
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no shard finished in 120 s"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
    finally:
        kill_tree(first)
    finished = sorted(out.glob("*_stats.json"))
    assert 0 < len(finished) < n // size, "the kill did not land mid-run"
    for tar in out.glob("*.tar"):  # every tar there is whole: renamed only once complete
        with tarfile.open(tar) as t:
            assert all(t.extractfile(m).read() for m in t.getmembers())

    slow_server.reset_counts()
    second = start_flow(listing, out, *shard_args, "--resume")
    try:
        stdout, stderr = second.communicate(timeout=240)
    finally:
        kill_tree(second)
    assert second.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert f"resume: {len(finished)} shards already done" in stdout
    rows = shard_rows(out)
    assert list(rows["url"]) == list(frame["url"]) and (rows["status"] == "success").all()
    done = {int(p.name[:5]) for p in finished}
    done_urls = {url for i, url in enumerate(frame["url"]) if i // size in done}
    fetched = {slow_server.base_url + p for p in slow_server.request_counts()}
    assert not fetched & done_urls  # finished shards: not a single request
    assert not list(out.rglob(".tmp-*"))


def test_statuses_map_to_img2dataset_outcomes() -> None:
    from imgtasks.shards import peer_status
    from imgtasks.status import DOWNLOAD, FLOW, SOURCE, THUMBNAIL, Status

    assert peer_status(Status.OK) == "success"
    assert {peer_status(s) for s in THUMBNAIL} == {"failed_to_resize"}
    assert {peer_status(s) for s in DOWNLOAD | SOURCE | FLOW} == {"failed_to_download"}
    assert {peer_status(s) for s in Status} == {"success", "failed_to_download", "failed_to_resize"}
