from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
import random
import tempfile
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgtasks.sources import (
    DUPLICATE,
    INVALID_URL,
    PENDING,
    SeenSet,
    SourceSettings,
    batched,
    classify,
    detect_format,
    read_urls,
    url_batches,
)

URLS = [f"http://127.0.0.1:9/img/{i}.jpg" for i in range(25)]


def write_list(path: Path, fmt: str, urls: list[str], column: str = "url") -> None:
    gz = path.name.endswith(".gz")
    if fmt == "parquet":
        pq.write_table(pa.table({column: urls, "other": list(range(len(urls)))}), path)
        return
    if fmt == "txt":
        text = "# a comment\n\n" + "\n".join(urls) + "\n"
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        text = f"id{sep}{column}\n" + "".join(f"{i}{sep}{u}\n" for i, u in enumerate(urls))
    else:
        text = "".join(json.dumps({"id": i, column: u}) + "\n" for i, u in enumerate(urls))
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)


# Parquet compresses internally: a gzip'd Parquet file is not a format anyone uses.
FORMAT_CASES = [(f, gz) for f in ("txt", "csv", "tsv", "jsonl") for gz in (False, True)]


@pytest.mark.parametrize(("fmt", "gz"), [*FORMAT_CASES, ("parquet", False)])
def test_every_format_reads_back_in_order(tmp_path: Path, fmt: str, gz: bool) -> None:
    path = tmp_path / (f"urls.{fmt}" + (".gz" if gz else ""))
    write_list(path, fmt, URLS)
    assert list(read_urls(SourceSettings(str(path)))) == URLS


def test_configurable_column(tmp_path: Path) -> None:
    path = tmp_path / "urls.csv"
    write_list(path, "csv", URLS, column="image")
    assert list(read_urls(SourceSettings(str(path), column="image"))) == URLS
    with pytest.raises(ValueError, match="column 'url'"):
        list(read_urls(SourceSettings(str(path))))


def test_fsspec_url(tmp_path: Path) -> None:
    import fsspec

    with fsspec.open("memory://lists/urls.txt.gz", "wb", compression="gzip") as f:
        f.write("\n".join(URLS).encode())
    assert list(read_urls(SourceSettings("memory://lists/urls.txt.gz"))) == URLS


def test_detect_format() -> None:
    assert detect_format("a/b/urls.csv.gz") == "csv"
    assert detect_format("s3://b/x.parquet") == "parquet"
    assert detect_format("x.ndjson") == "jsonl"
    assert detect_format("urls") == "txt"
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format("urls.xlsx")


def test_malformed_entries_become_records_not_exceptions(tmp_path: Path) -> None:
    path = tmp_path / "urls.jsonl"
    path.write_text(
        '{"url": "http://127.0.0.1:9/a.jpg"}\n'
        "this is not json\n"
        '{"url": null}\n'
        '{"url": "ftp://example.org/x.jpg"}\n'
        '["not", "an", "object"]\n'
    )
    entries = list(classify(read_urls(SourceSettings(str(path)))))
    assert [e.status for e in entries] == [PENDING] + [INVALID_URL] * 4
    assert all(e.error for e in entries[1:])
    assert [e.index for e in entries] == list(range(5))


@pytest.mark.parametrize(
    "bad",
    [
        "not a url",
        "ftp://host/x.jpg",
        "file:///etc/passwd",
        "http://",
        "https:///x",
        "http://h/" + "a" * 5000,
        "",
    ],
)
def test_invalid_urls(bad: str) -> None:
    (entry,) = classify([bad])
    assert entry.status == INVALID_URL
    assert entry.error


def test_duplicates_are_recorded_once_processed_once() -> None:
    urls = [
        "http://h/a.jpg",
        "http://h/b.jpg",
        "http://h/a.jpg",
        "http://h/b.jpg",
        "http://h/c.jpg",
    ]
    entries = list(classify(urls))
    assert [e.status for e in entries] == [PENDING, PENDING, DUPLICATE, DUPLICATE, PENDING]


def test_batches_hold_batch_size_fetches_and_keep_every_entry() -> None:
    urls = [f"http://h/{i}.jpg" for i in range(50)] + ["bad url"] * 3 + ["http://h/0.jpg"]
    batches = list(batched(classify(urls), 16))
    assert [len(b.pending_urls) for b in batches] == [16, 16, 16, 2]
    assert [b.batch_id for b in batches] == [0, 1, 2, 3]
    indexes = [e.index for b in batches for e in b.entries]
    assert indexes == list(range(len(urls)))


def test_batches_of_only_bad_entries_stay_bounded() -> None:
    batches = list(batched(classify(["bad"] * 1000), 4))
    assert max(len(b.entries) for b in batches) <= 32
    assert sum(len(b.entries) for b in batches) == 1000


def test_seen_set_grows_and_remembers() -> None:
    seen = SeenSet(capacity=4)
    urls = [f"http://h/{i}" for i in range(5000)]
    assert all(seen.add(u) for u in urls)
    assert len(seen) == 5000
    assert not any(seen.add(u) for u in urls)
    assert "http://h/17" in seen
    assert "http://h/-1" not in seen


def test_seen_set_grows_slice_by_slice_and_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Growth re-inserts the old table a slice at a time (bounded memory): every URL is
    still there after many growths over many slices."""
    monkeypatch.setattr(SeenSet, "GROW_SLICE", 64)
    seen = SeenSet(capacity=4)
    urls = [f"http://h/{i}" for i in range(3000)]
    assert all(seen.add(u) for u in urls)
    assert len(seen) == 3000 and all(u in seen for u in urls)
    assert not any(seen.add(u) for u in urls) and "http://h/3000" not in seen


def test_seen_set_growth_never_holds_a_second_copy_of_its_tables() -> None:
    """Growing doubles one shard at a time: at no moment does the set hold much more than
    its tables (one table for all grew into a copy of it: 1.5x at each doubling)."""
    seen = SeenSet(capacity=16, memory_keys=1 << 30)  # never spills: growth alone
    tracemalloc.start()
    for i in range(100_000):
        seen.add(f"http://h/{i}")
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert current >= seen.nbytes()  # numpy's buffers are traced: the check measures them
    assert peak < 1.15 * seen.nbytes(), (peak, seen.nbytes())


def test_seen_set_spills_old_urls_to_disk_and_stays_exact() -> None:
    """Past ``memory_keys`` the hashes move to the temporary file: a repeat is found
    whether its first sighting is in memory or spilled, and a new URL is never taken for
    a repeat (checked against a plain set, repeats at every distance)."""
    rng = random.Random(7)
    seen, reference = SeenSet(capacity=16, memory_keys=500), set()
    for _ in range(20_000):
        url = f"http://h/{rng.randrange(12_000)}"
        assert seen.add(url) == (url not in reference), url
        reference.add(url)
    assert len(seen) == len(reference) > 5 * 500
    assert all(u in seen for u in reference) and "http://h/-1" not in seen
    seen.close()


def test_seen_set_memory_stays_the_same_from_20k_to_200k_urls() -> None:
    """What the set holds in memory stops growing once it spills (every hash stayed in
    memory before: 16 bytes per URL)."""
    seen = SeenSet(capacity=16, memory_keys=4096)
    tracemalloc.start()
    for i in range(20_000):
        seen.add(f"http://h/{i}")
    at_20k, held_20k = tracemalloc.get_traced_memory()[0], seen.nbytes()
    for i in range(20_000, 200_000):
        seen.add(f"http://h/{i}")
    at_200k, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(seen) == 200_000
    # the tables' fill varies between spills, by less than what 4096 URLs took
    assert seen.nbytes() < held_20k + 4096 * 16, (held_20k, seen.nbytes())
    assert at_200k < at_20k + 200_000, (at_20k, at_200k)  # 16 bytes per URL: +2.9 MB
    assert peak < at_20k + 1_000_000, (at_20k, peak)
    seen.close()


def test_seen_set_file_is_in_the_temp_dir_and_removed_at_once(tmp_path: Path) -> None:
    """The spilled hashes' file is made in the temporary directory and unlinked there at
    once: nothing is left behind, even by a killed run."""
    spills = tmp_path / "tmp"
    spills.mkdir()
    old, tempfile.tempdir = tempfile.tempdir, str(spills)
    try:
        seen = SeenSet(capacity=16, memory_keys=100)
        assert all(seen.add(f"http://h/{i}") for i in range(1000))
    finally:
        tempfile.tempdir = old
    fds = Path("/proc/self/fd")
    if fds.is_dir():  # Linux: the open file is there, deleted
        targets = [os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()]
        assert any(t.startswith(str(spills)) and t.endswith("(deleted)") for t in targets)
    assert list(spills.iterdir()) == []
    assert not any(seen.add(f"http://h/{i}") for i in range(1000))
    seen.close()
    assert list(spills.iterdir()) == []


def test_seen_set_keeps_urls_in_memory_when_the_temp_dir_cannot_take_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No usable temporary directory: one warning saying what to do, and still exact."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    old, tempfile.tempdir = tempfile.tempdir, str(not_a_dir)
    try:
        seen = SeenSet(capacity=16, memory_keys=100)
        with caplog.at_level(logging.WARNING, logger="imgtasks.sources"):
            assert all(seen.add(f"http://h/{i}") for i in range(1000))
    finally:
        tempfile.tempdir = old
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "set TMPDIR" in warnings[0], warnings
    assert not any(seen.add(f"http://h/{i}") for i in range(1000)) and len(seen) == 1000


def test_classify_finds_repeats_across_spills(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SeenSet, "MEMORY_KEYS", 64)
    urls = [f"http://127.0.0.1:9/img/{i % 700}.jpg" for i in range(2000)]
    entries = list(classify(urls))
    assert [e.status for e in entries] == [PENDING] * 700 + [DUPLICATE] * 1300


def test_big_list_is_streamed_not_loaded(tmp_path: Path) -> None:
    """A list far bigger than one batch: reading the first batches costs little memory."""
    path = tmp_path / "big.txt.gz"
    with gzip.open(path, "wt") as f:
        for i in range(300_000):
            f.write(f"http://127.0.0.1:9/img/{i:09d}.jpg\n")
    tracemalloc.start()
    first = list(itertools.islice(url_batches(SourceSettings(str(path), batch_size=64)), 10))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(first) == 10
    # the whole list is ~11 MB of str objects; ten batches must cost well under that
    assert peak < 3_000_000, peak


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        SourceSettings("x.txt", batch_size=0)
    with pytest.raises(ValueError):
        SourceSettings("x.txt", format="xlsx")


def test_batches_take_the_size_asked_for_as_each_one_starts() -> None:
    sizes = iter([2, 3, 5, 1, 4])
    batches = list(batched(classify([f"http://h/{i}.jpg" for i in range(12)]), lambda: next(sizes)))
    assert [len(b.entries) for b in batches] == [2, 3, 5, 1, 1]
