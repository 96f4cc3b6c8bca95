"""Input read by the cluster (``read_on="workers"``): the workers plan and read the list's
partitions (Parquet row groups, csv byte blocks, a dask DataFrame's partitions); the
client never opens the list. Checked: one manifest row per input line with its line
number as ``index``, repeats found within a partition only (as documented), resume, the
caption and kept columns, on a local path and on an S3 server (moto, on 127.0.0.1).

The cluster is a LocalCluster of worker processes: a spy in this process sees only what
the client does.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dask.dataframe as dd
import fsspec.spec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import RUN, subprocess_environment
from distributed import Client, LocalCluster, get_task_stream
from test_s3 import BUCKET, S3, s3  # noqa: F401 - the moto server fixture

import imgtasks
from imgtasks import partitions, sources
from imgtasks.partitions import ListPart, plan_list, read_list_part
from imgtasks.sources import InputColumns, SourceSettings

LINES = 30
BLOCK = 200  # bytes of csv per partition here: ~5 lines of ~38 bytes
ROWS = 5  # rows of a Parquet row group per partition here (row groups of 8)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            processes=True,
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture
def small_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small partitions: the client reads these at run time and hands them to the planner."""
    monkeypatch.setattr(partitions, "BLOCK_SIZE", BLOCK)
    monkeypatch.setattr(partitions, "PART_ROWS", ROWS)


class Spy:
    """What the client process opened through fsspec, and whether it read a list itself."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[str] = []
        self.read_rows = 0
        real_open, real_read_rows = fsspec.spec.AbstractFileSystem.open, sources.read_rows

        def open_(fs: fsspec.AbstractFileSystem, path: str, *args: object, **kwargs: object):
            self.opened.append(str(path))
            return real_open(fs, path, *args, **kwargs)

        def read_rows(settings: SourceSettings):
            self.read_rows += 1
            return real_read_rows(settings)

        monkeypatch.setattr(fsspec.spec.AbstractFileSystem, "open", open_)
        monkeypatch.setattr(sources, "read_rows", read_rows)

    def start(self) -> None:
        """From here on: what the test did itself before is not the client's doing."""
        self.opened.clear()
        self.read_rows = 0

    def never_read(self, name: str) -> None:
        assert self.read_rows == 0
        assert not [p for p in self.opened if name in p], self.opened


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    return Spy(monkeypatch)


def input_lines(demo_server) -> list[str]:
    """A repeat inside the first partition (line 1), a repeat in another one (the last
    line), a line that is no URL."""
    urls = list(demo_server.urls(LINES))
    urls[1] = urls[0]
    urls[LINES - 1] = urls[0]
    urls[9] = "not a url"
    return urls


def as_table(urls: list[str]) -> pa.Table:
    n = len(urls)
    return pa.table({"url": urls, "cap": [f"c{i}" for i in range(n)], "rank": list(range(n))})


def check_rows(result: imgtasks.Result, urls: list[str]) -> pd.DataFrame:
    df = result.manifest().sort_values("index").reset_index(drop=True)
    assert list(df["index"]) == list(range(LINES))  # one row per line, numbered as in the list
    assert list(df["url"]) == urls
    # Repeats are found within a partition: line 1 is a duplicate of line 0; the last
    # line, in another partition, is fetched again into the same file.
    assert result.counts == {"ok": LINES - 2, "duplicate": 1, "invalid_url": 1}
    assert df.loc[1, "status"] == "duplicate" and df.loc[LINES - 1, "status"] == "ok"
    assert df.loc[LINES - 1, "path"] == df.loc[0, "path"] != ""
    assert result.entries == LINES and not result.failed_batches
    return df


def check_columns(df: pd.DataFrame) -> None:
    assert list(df["caption"]) == [f"c{i}" for i in range(LINES)]
    assert list(df["rank"].astype(int)) == list(range(LINES))


def run(urls: object, out: str, client: Client, **options: object) -> imgtasks.Result:
    return imgtasks.thumbnails(
        urls, out, client=client, progress=False, job_page=False, read_on="workers", **options
    )


def test_partitions_of_a_parquet_list_and_their_rows(tmp_path: Path) -> None:
    """The plan: row groups cut at ``part_rows``; a partition's lines numbered from 0."""
    path = tmp_path / "urls.parquet"
    pq.write_table(as_table([f"http://h/{i}" for i in range(20)]), path, row_group_size=8)
    settings = SourceSettings(str(path), batch_size=2, columns=InputColumns("cap"))
    plan = plan_list(settings, part_rows=5)
    assert [(p.row_group, p.start, p.stop) for p in plan.parts] == [
        (0, 0, 5), (0, 5, 8), (1, 0, 5), (1, 5, 8), (2, 0, 4)
    ]  # fmt: skip
    part = read_list_part(plan.parts[1], settings, done={})
    assert part.size == (2, 3)
    entries = [e for batch, _ in part.batches for e in batch.entries]
    assert [(e.index, e.url, e.carried.caption) for e in entries] == [
        (i - 5, f"http://h/{i}", f"c{i}") for i in range(5, 8)
    ]


def test_text_blocks_hold_every_line_once(tmp_path: Path) -> None:
    """Blocks are cut at the newline after each end: every line in exactly one block."""
    lines = [f"http://h/{'x' * (i % 13)}{i}" for i in range(200)]
    path = tmp_path / "urls.txt"
    path.write_text("\n".join(lines) + "\n")
    settings = SourceSettings(str(path))
    plan = plan_list(settings, block_size=97)
    assert len(plan.parts) > 10 and all(p.kind == "bytes" for p in plan.parts)
    read = [read_list_part(p, settings, done={}) for p in plan.parts]
    urls = [e.url for part in read for batch, _ in part.batches for e in batch.entries]
    assert urls == lines


@pytest.mark.parametrize("fmt", ["txt", "csv", "tsv", "jsonl", "parquet", "csv.gz"])
def test_partitions_read_what_the_client_would(fmt: str, tmp_path: Path) -> None:
    """Every format: the partitions' lines, in order, are the client reader's lines."""
    table = as_table([f"http://h/{'y' * (i % 7)}{i}.jpg" for i in range(120)]).to_pandas()
    table.loc[17, "url"], table.loc[40, "cap"] = "", "a, quoted\tcaption"
    path = tmp_path / f"urls.{fmt}"
    if fmt == "txt":
        path.write_text("# comment\n" + "\n\n".join(table["url"].replace("", "x")) + "\n")
    elif fmt == "jsonl":
        table.to_json(path, orient="records", lines=True)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pandas(table), path, row_group_size=50)
    else:
        table.to_csv(path, index=False, sep="\t" if fmt == "tsv" else ",")
    columns = InputColumns() if fmt == "txt" else InputColumns("cap", ("rank",))
    settings = SourceSettings(str(path), columns=columns)
    plan = plan_list(settings, block_size=300, part_rows=30)
    assert len(plan.parts) == (1 if fmt == "csv.gz" else 5 if fmt == "parquet" else len(plan.parts))
    assert len(plan.parts) > 1 or fmt == "csv.gz"
    read = [row for part in plan.parts for row in partitions.part_rows(part, settings)]
    assert read == list(sources.read_rows(settings))


@pytest.mark.timeout(90)
def test_a_parquet_list_read_by_workers_then_resumed(
    tmp_path: Path, demo_server, client: Client, small_partitions: None, spy: Spy
) -> None:
    urls = input_lines(demo_server)
    listing = tmp_path / "urls.parquet"
    pq.write_table(as_table(urls), listing, row_group_size=8)
    assert pq.ParquetFile(listing).num_row_groups == 4
    out = str(tmp_path / "out")
    options = {"caption_column": "cap", "keep_columns": ["rank"], "batch_size": 4}
    df = check_rows(run(str(listing), out, client, **options), urls)
    check_columns(df)
    assert df["rank"].dtype.kind == "i"  # the kept column's Parquet type, told by a worker

    # one thumbnail lost: resume fetches exactly that URL again, every line keeps its row
    lost = df.loc[5]
    (Path(out) / lost["path"]).unlink()
    demo_server.reset_counts()
    result = run(str(listing), out, client, resume=True, **options)
    spy.never_read(listing.name)
    requests = {p: n for p, n in demo_server.request_counts().items() if p.startswith("/img/")}
    assert requests == {lost["url"].removeprefix(demo_server.base_url): 1}
    assert result.resumed == LINES - 3
    check_columns(check_rows(result, urls))


@pytest.mark.timeout(90)
def test_a_csv_list_read_by_workers_in_blocks(
    tmp_path: Path, demo_server, client: Client, small_partitions: None, spy: Spy
) -> None:
    urls = input_lines(demo_server)
    listing = tmp_path / "urls.csv"
    as_table(urls).to_pandas().to_csv(listing, index=False)
    assert plan_list(SourceSettings(str(listing)), block_size=BLOCK).parts[3] == ListPart(
        3, "bytes", start=3 * BLOCK, stop=4 * BLOCK, path=str(listing)
    )
    result = run(str(listing), str(tmp_path / "out"), client, caption_column="cap",
                 keep_columns="rank")  # fmt: skip
    spy.never_read(listing.name)
    check_columns(check_rows(result, urls))


@pytest.mark.timeout(90)
def test_every_download_worker_gets_a_partition_at_once(
    tmp_path: Path, demo_server, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download node runs where its partition was read (Dask places a task with its
    data): two partitions, read on the two workers, send batches in turn, so the first
    window already downloads on both (one partition at a time: on one)."""
    monkeypatch.setattr(partitions, "PART_ROWS", 15)
    urls = demo_server.urls(LINES)
    listing = tmp_path / "urls.parquet"
    pq.write_table(as_table(urls), listing)
    with get_task_stream(client) as tasks:
        result = run(str(listing), str(tmp_path / "out"), client, batch_size=2, window=4)
    assert result.counts == {"ok": LINES}
    downloads = [t for t in tasks.data if str(t["key"]).startswith("download-")]
    assert len(downloads) == 2 * 8  # two partitions of 15 lines, batches of 2
    first = sorted(downloads, key=lambda t: min(s["start"] for s in t["startstops"]))[:4]
    assert len({t["worker"] for t in first}) == 2


@pytest.mark.timeout(90)
def test_a_glob_of_lists_is_read_file_after_file(
    tmp_path: Path, demo_server, client: Client, spy: Spy
) -> None:
    """``urls-*.csv``: the files in name order, one input; lines numbered across them."""
    urls = input_lines(demo_server)
    frame = as_table(urls).to_pandas()
    for n, start in enumerate(range(0, LINES, 12)):
        frame.iloc[start : start + 12].to_csv(tmp_path / f"urls-{n}.csv", index=False)
    pattern = str(tmp_path / "urls-*.csv")
    with pytest.raises(ValueError, match="read by the workers only"):
        imgtasks.thumbnails(pattern, tmp_path / "out", client=client)
    spy.start()
    result = run(pattern, str(tmp_path / "out"), client, caption_column="cap", keep_columns="rank")
    spy.never_read("urls-")
    check_columns(check_rows(result, urls))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_a_list_on_s3_read_by_workers(
    kind: str,
    s3: S3,  # noqa: F811 - the fixture imported above
    demo_server,
    client: Client,
    small_partitions: None,
    spy: Spy,
) -> None:
    urls = input_lines(demo_server)
    key = f"{BUCKET}/lists/urls-{kind}.{kind}"
    with s3.fs().open(key, "wb") as f:
        if kind == "parquet":
            pq.write_table(as_table(urls), f, row_group_size=8)
        else:
            f.write(as_table(urls).to_pandas().to_csv(index=False).encode())
    prefix = f"s3://{BUCKET}/cluster-input-{kind}"
    spy.start()
    result = run(f"s3://{key}", prefix, client, storage_options=s3.options,
                 caption_column="cap", keep_columns=["rank"])  # fmt: skip
    spy.never_read(key)
    check_columns(check_rows(result, urls))
    assert s3.fs().exists(f"{prefix.removeprefix('s3://')}/{result.manifest()['path'][0]}")


@pytest.mark.timeout(90)
def test_a_dask_dataframe_is_read_by_the_workers(
    tmp_path: Path, demo_server, client: Client, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default (read_on="auto") on a distributed cluster: each partition is computed
    and batched on a worker; nothing of it comes back to the client."""
    urls = input_lines(demo_server)
    table = as_table(urls).to_pandas()
    folder = tmp_path / "frame"
    folder.mkdir()
    for n, start in enumerate(range(0, LINES, 10)):  # three files: three partitions
        table.iloc[start : start + 10].to_parquet(folder / f"part-{n}.parquet", index=False)
    frame = dd.read_parquet(str(folder))
    assert frame.npartitions == 3
    tolist = []
    real = pd.Series.tolist
    monkeypatch.setattr(pd.Series, "tolist", lambda s: tolist.append(len(s)) or real(s))
    spy.start()
    result = imgtasks.thumbnails(
        frame, tmp_path / "out", client=client, progress=False, job_page=False,
        caption_column="cap", keep_columns=["rank"],
    )  # fmt: skip
    assert not tolist  # no partition was turned into rows here
    spy.never_read(str(folder))
    monkeypatch.undo()
    df = check_rows(result, urls)
    check_columns(df)


def test_what_the_workers_cannot_read_is_refused_early(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="URL list path or a dask DataFrame"):
        imgtasks.thumbnails(["http://h/a.jpg"], tmp_path, read_on="workers")
    with pytest.raises(ValueError, match="distributed cluster"):
        imgtasks.thumbnails(str(tmp_path / "x.txt"), tmp_path, read_on="workers", cluster="sync")
    with pytest.raises(ValueError, match="read_on must be one of"):
        imgtasks.thumbnails(str(tmp_path / "x.txt"), tmp_path, read_on="somewhere")


def test_the_command_line_switch(tmp_path: Path) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text("http://127.0.0.1:9/a.jpg\n")
    proc = subprocess.run(
        [sys.executable, RUN, "--urls", str(listing), "--read-on", "workers", "--scheduler",
         "sync", "--out", str(tmp_path / "out")],
        env=subprocess_environment(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "distributed cluster" in proc.stderr


@pytest.mark.timeout(90)
def test_a_batch_failing_every_retry_still_gives_its_lines_rows(
    tmp_path: Path, demo_server, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client holds no entries of a batch the workers read: a worker writes the
    ``batch_failed`` rows from the batch's partition."""
    from imgtasks import flow

    real = flow.thumbnail_part_batch

    def poisoned(downloaded, job):
        if downloaded.downloaded.batch.batch_id == 1:
            raise OSError("the store refuses this batch")
        return real(downloaded, job)

    monkeypatch.setattr(flow, "thumbnail_part_batch", poisoned)  # pickled by value
    urls = demo_server.urls(20)
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    result = run(str(listing), str(tmp_path / "out"), client, batch_size=5)
    assert result.counts == {"ok": 15, "batch_failed": 5} and len(result.failed_batches) == 1
    df = result.manifest().sort_values("index").reset_index(drop=True)
    assert list(df["url"]) == urls and list(df["index"]) == list(range(20))
    assert list(df["status"][5:10]) == ["batch_failed"] * 5


def test_a_missing_column_is_found_by_the_plan(tmp_path: Path) -> None:
    path = tmp_path / "urls.parquet"
    pq.write_table(as_table(["http://h/a.jpg"]), path)
    with pytest.raises(ValueError, match="'link' not in the Parquet schema"):
        plan_list(SourceSettings(str(path), column="link"))
