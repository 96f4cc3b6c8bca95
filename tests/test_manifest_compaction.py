"""The manifest's compaction: few parts, every row exactly once, crash or not."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from distributed import Client, LocalCluster

import imgtasks
from imgtasks import manifest
from imgtasks.jobfeed import JobFeed
from imgtasks.manifest import (
    Record,
    Rollup,
    compact_parts,
    current_rows,
    finished_rows,
    keep_only_run,
    manifest_parts,
    part_name,
    read_manifest,
    write_manifest_part,
)
from imgtasks.nodes import BatchReport
from imgtasks.sinks import OutputSettings

RUN = "20261130T120000.000000Z-abc123"  # as flow.new_run_id makes them: hyphens inside


def part_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "manifest").glob("part-*.parquet"))


def write_batches(settings: OutputSettings, batches: int, rows: int, run: str = RUN) -> None:
    """``batches`` parts of ``rows`` ok rows each, their thumbnails present, in a random
    order (batches finish out of order)."""
    root = Path(settings.root)
    for batch_id in random.Random(batches).sample(range(batches), batches):
        records = []
        for i in range(batch_id * rows, (batch_id + 1) * rows):
            path = f"t/{i}.jpg"
            (root / "t").mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(b"jpeg")
            records.append(Record(i, f"http://h/{i}", "ok", path=path, width=i % 128))
        write_manifest_part(settings, run, batch_id, records)


def roll_up(settings: OutputSettings, batches: int, rows: int, run: str = RUN) -> None:
    """The flow's path: each batch reported in a random order, spans compacted as ready."""
    rollup = Rollup(settings.manifest_part_rows)
    order = random.Random(batches + 1).sample(range(batches), batches)
    spans = [span for b in order for span in rollup.add(b, rows)] + rollup.finish()
    for span in spans:
        compact_parts(settings, run, *span)


def compact_failing(
    monkeypatch: pytest.MonkeyPatch, step: str, settings: OutputSettings, last: int
) -> None:
    """Compact batches 0..last with ``manifest.<step>`` failing as a crash or a full disk."""

    def fail(*_: object) -> None:
        raise OSError(f"{step} failed")

    monkeypatch.setattr(manifest, step, fail)
    with pytest.raises(OSError, match=f"{step} failed"):
        compact_parts(settings, RUN, 0, last)
    monkeypatch.undo()


def assert_exact(settings: OutputSettings, n: int) -> None:
    """Every library reader sees rows 0..n-1 once each, in index order."""
    table = read_manifest(settings)
    assert table.column("index").to_pylist() == list(range(n))
    assert table.column("url").to_pylist() == [f"http://h/{i}" for i in range(n)]
    assert sorted(r.index for r in current_rows(settings).values()) == list(range(n))
    assert len(finished_rows(settings)) == n


# --- the client's bookkeeping ---------------------------------------------------------------


def test_rollup_cuts_consecutive_finished_batches_once_they_hold_enough_rows() -> None:
    rollup = Rollup(10)
    assert rollup.add(1, 4) == []  # batch 0 not finished: nothing can start
    assert rollup.add(2, 4) == []
    assert rollup.add(0, 4) == [(0, 2)]  # 12 rows >= 10
    assert rollup.add(4, 4) == []
    assert rollup.add(3, 30) == [(3, 3)]  # a big batch is a span of its own
    assert rollup.add(5, 4) == []
    assert rollup.add(7, 4) == []  # batch 6 never reported (its part could not be written)
    assert rollup.finish() == [(4, 5), (7, 7)]
    assert rollup.finish() == []


def test_rollup_spans_cover_every_batch_once_in_any_finishing_order() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        rows = {b: rng.randint(1, 9) for b in range(200)}
        rollup = Rollup(25)
        spans = [s for b in rng.sample(list(rows), len(rows)) for s in rollup.add(b, rows[b])]
        full = list(spans)
        spans += rollup.finish()
        covered = [b for first, last in spans for b in range(first, last + 1)]
        assert covered == list(range(200))
        assert all(sum(rows[b] for b in range(f, last + 1)) >= 25 for f, last in full)
        # cut as soon as the span holds enough: without its last batch it would not
        assert all(sum(rows[b] for b in range(f, last)) < 25 for f, last in full)


# --- compaction on the store ----------------------------------------------------------------


def test_compaction_leaves_few_parts_and_every_row_once(tmp_path: Path) -> None:
    settings = OutputSettings(str(tmp_path), manifest_part_rows=30)
    write_batches(settings, batches=40, rows=4)
    assert len(part_files(tmp_path)) == 40
    roll_up(settings, batches=40, rows=4)
    names = part_files(tmp_path)
    # 8 batches (32 rows) per part: 5 parts of 8 batches, every batch part gone
    assert len(names) == 5
    assert all(part_name(n).compacted for n in names)  # type: ignore[union-attr]
    assert_exact(settings, 160)
    plain = pd.read_parquet(tmp_path / "manifest")  # the README's reader: no duplicates
    assert sorted(plain["index"]) == list(range(160))


def test_a_crash_after_the_compacted_write_leaves_readers_exact_and_a_rerun_tidies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = OutputSettings(str(tmp_path), manifest_part_rows=1000)
    write_batches(settings, batches=6, rows=5)
    compact_failing(monkeypatch, "_remove", settings, 5)  # killed before the deletion
    assert len(part_files(tmp_path)) == 7  # the compacted part and the 6 it covers
    assert manifest_parts(settings) == [f"manifest/part-{RUN}-00000000_00000005.parquet"]
    assert_exact(settings, 30)
    # a crash half-way through the deletion: some covered parts gone, some left
    (tmp_path / "manifest" / f"part-{RUN}-00000002.parquet").unlink()
    assert_exact(settings, 30)

    compact_parts(settings, RUN, 0, 5)  # Dask's retry, or the next compaction: idempotent
    assert part_files(tmp_path) == [f"part-{RUN}-00000000_00000005.parquet"]
    assert_exact(settings, 30)


def test_covered_parts_are_deleted_at_the_end_of_a_complete_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = OutputSettings(str(tmp_path), manifest_part_rows=10)
    write_batches(settings, batches=3, rows=5, run="20261101T000000.000000Z-000000")  # older
    write_batches(settings, batches=4, rows=5)
    monkeypatch.setattr(manifest, "_remove", lambda *_: None)  # deletions lost
    roll_up(settings, batches=4, rows=5)
    monkeypatch.undo()
    assert len(part_files(tmp_path)) == 3 + 4 + 2
    keep_only_run(settings, RUN)
    assert part_files(tmp_path) == [
        f"part-{RUN}-00000000_00000001.parquet",
        f"part-{RUN}-00000002_00000003.parquet",
    ]
    assert_exact(settings, 20)


def test_a_failed_compacted_write_or_a_missing_part_keeps_the_batch_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = OutputSettings(str(tmp_path))
    write_batches(settings, batches=4, rows=3)
    compact_failing(monkeypatch, "write_file", settings, 3)  # the store refuses the write
    with pytest.raises(FileNotFoundError, match="missing"):
        compact_parts(settings, RUN, 0, 4)  # batch 4 was never written
    assert len(part_files(tmp_path)) == 4
    assert_exact(settings, 12)


# --- real runs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=4,
            processes=False,
            protocol="tcp",
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def image_requests(demo_server) -> dict[str, int]:
    return {p: n for p, n in demo_server.request_counts().items() if p.startswith("/img/")}


def test_a_run_ends_with_compacted_parts_only_and_resume_reads_them(
    tmp_path: Path, demo_server, client: Client
) -> None:
    urls = demo_server.urls(30)
    lines = [*urls[:10], "not a url", urls[3], *urls[10:]]  # every line gets its row
    out = OutputSettings(str(tmp_path / "out"), manifest_part_rows=10)
    result = imgtasks.thumbnails(lines, out, client=client, batch_size=4, progress=False)
    assert result.counts == {"ok": 30, "invalid_url": 1, "duplicate": 1}
    names = part_files(tmp_path / "out")
    assert all(part_name(n).compacted for n in names), names  # type: ignore[union-attr]
    # 8 batches (4 URLs each, the odd lines riding along): spans of >= 10 rows (batches
    # 0-2, 3-5) as they finish, and batches 6-7 at the end
    assert len(names) == 3, names
    plain = pd.read_parquet(tmp_path / "out" / "manifest")
    assert sorted(plain["index"]) == list(range(len(lines)))
    assert len(result.manifest()) == len(lines)

    lost = plain[plain["url"] == urls[17]].iloc[0]
    (tmp_path / "out" / lost["path"]).unlink()
    demo_server.reset_counts()
    again = imgtasks.thumbnails(
        lines, out, client=client, batch_size=4, resume=True, progress=False
    )
    assert again.resumed == 29
    assert image_requests(demo_server) == {urls[17].removeprefix(demo_server.base_url): 1}
    assert len(part_files(tmp_path / "out")) == 3  # the earlier run's parts are gone
    df = again.manifest().sort_values("index")
    assert list(df["url"]) == lines
    assert dict(df["status"].value_counts()) == again.counts


def test_sync_mode_compacts_too_and_the_job_page_finds_the_compacted_rows(
    tmp_path: Path, demo_server
) -> None:
    out = OutputSettings(str(tmp_path), manifest_part_rows=8)
    result = imgtasks.thumbnails(
        demo_server.urls(20), out, cluster="sync", batch_size=4, progress=False, job_page=False
    )
    assert result.ok == 20
    assert part_files(tmp_path) == [
        f"part-{result.run_id}-00000000_00000001.parquet",
        f"part-{result.run_id}-00000002_00000003.parquet",
        f"part-{result.run_id}-00000004_00000004.parquet",
    ]
    assert sorted(pd.read_parquet(tmp_path / "manifest")["index"]) == list(range(20))
    # the page heard of the batch parts while they existed; it reads the compacted ones
    feed = JobFeed(out, result.run_id)
    for batch_id in range(5):
        path = manifest.manifest_relpath(result.run_id, batch_id)
        feed.add(BatchReport(batch_id, path, {"ok": 4}, entries=4))
    tiles = feed.recent_tiles(6)
    assert [t.index for t in tiles] == [19, 18, 17, 16, 15, 14]
    assert all(t.image for t in tiles)


def test_the_bench_compacts_through_the_real_path_and_checks_every_reader(capsys) -> None:
    import manifest_bench  # benchmarks/ (on sys.path: conftest)

    assert manifest_bench.main(["--counts", "320", "--part-rows", "100"]) == 0
    printed = capsys.readouterr().out
    files = next(line for line in printed.splitlines() if line.startswith("files"))
    # 20 batches of 16 rows: 2 parts of 7 batches (112 rows), the last 96 rows at the end
    assert files.split()[1:3] == ["20", "3"]
    assert "goal" in printed and ": met" in printed
