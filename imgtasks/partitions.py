"""The input read by the workers: a URL list's partitions, plain functions, no dask.

With ``read_on="workers"`` (``--read-on workers``) the client never opens the URL list.
A worker plans the list's partitions (:func:`plan_list`: Parquet row groups, at most
``PART_ROWS`` rows each; byte blocks of ``BLOCK_SIZE`` split at newlines, as
``dask.bytes.read_bytes`` splits them; a compressed list is one partition; a glob of
lists, file after file in name order), and each partition is read on a worker
(:func:`read_list_part`, or :func:`read_frame_part` for a dask DataFrame's partition)
into a :class:`Partition`: its entries classified and cut into batches there. The
client only sees descriptors, and each partition's size.

Index: each partition numbers its lines from 0; the client adds the partition's offset
(the sum of the sizes of the partitions before it, learnt as their reads finish, in
order) when it names a batch (:class:`PartBatch`), so a manifest row's ``index`` is the
line's number in the whole list, exactly as when the client reads it.

De-duplication: within a partition (a repeat there is a ``duplicate`` row); the same URL
in two partitions is fetched twice, each line getting an ``ok`` row of the same file.

Resume: the URLs an earlier run finished go to the workers once (a scattered mapping);
each read node marks its entries found there as resumed, with their old rows.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import fsspec
from fsspec.utils import infer_compression, read_block

from imgtasks.download import DownloadSettings
from imgtasks.manifest import KeptColumns, Record
from imgtasks.nodes import (
    BatchReport,
    DownloadedBatch,
    JobSettings,
    download_batch,
    record_failed_batch,
    resume_batch,
    thumbnail_batch,
)
from imgtasks.sources import (
    InputColumns,
    Row,
    SourceSettings,
    UrlBatch,
    _check_columns,
    _read_delimited,
    _read_jsonl,
    _read_txt,
    _url,
    batched,
    classify,
    detect_format,
    kept_kinds,
    read_rows,
)

log = logging.getLogger(__name__)

# A partition's entries live on a worker until its batches are done: ~300 bytes each as
# Python objects, so 50,000 rows or a 4 MiB block (~50,000 URLs of ~80 bytes) is ~15 MB.
BLOCK_SIZE = 4 * 2**20
PART_ROWS = 50_000

Done = Mapping[str, Record]  # resume: the finished URLs' rows


@dataclass(frozen=True)
class ListPart:
    """One partition of a URL list: a row range of a Parquet row group, a byte block of a
    text list (lines are cut at the newline after each end, as ``read_bytes`` cuts them),
    or the whole (compressed) file."""

    number: int
    kind: str  # "rows", "bytes" or "whole"
    row_group: int = 0
    start: int = 0  # rows of the row group, or bytes of the file
    stop: int = 0
    path: str = ""  # the file (of a glob's); "" the list's own path


@dataclass(frozen=True)
class ListPlan:
    """What a worker found out about the list: its partitions, the kept columns' kinds."""

    parts: tuple[ListPart, ...]
    kept: KeptColumns


@dataclass(frozen=True)
class Partition:
    """One partition read and cut into batches on a worker: the batches (entries numbered
    from 0 in the partition) each with its resumed rows, and the partition's line count."""

    batches: tuple[tuple[UrlBatch, dict[int, Record]], ...]
    lines: int

    @property
    def size(self) -> tuple[int, int]:
        """(batches, lines): all the client hears of a partition."""
        return len(self.batches), self.lines


@dataclass(frozen=True)
class BatchPlace:
    """Where one batch of a partition sits in the whole input."""

    number: int  # the batch's position in its partition
    offset: int  # input lines before the partition
    batch_id: int  # unique in the run: names its manifest part


@dataclass(frozen=True)
class PartBatch:
    """The client's handle on one batch that lives on the workers: the partition's
    future (kept until the batch is done) and the batch's place."""

    part: Any  # a distributed Future of a Partition
    place: BatchPlace

    @property
    def batch_id(self) -> int:
        return self.place.batch_id


@dataclass(frozen=True)
class PartDownloaded:
    """A downloaded batch and the rows its resumed entries carry over."""

    downloaded: DownloadedBatch
    previous: dict[int, Record]


def is_glob(path: str) -> bool:
    """A pattern of several lists (``s3://b/laion/*.parquet``); a ``?`` is a URL's query."""
    return "*" in path


def list_files(settings: SourceSettings) -> list[str]:
    """The list's files: its path, or the files its glob matches, in name order."""
    if not is_glob(settings.path):
        return [settings.path]
    fs, pattern = fsspec.core.url_to_fs(settings.path, **settings.storage_options)
    return [fs.unstrip_protocol(path) for path in sorted(fs.glob(pattern))]


def plan_list(
    settings: SourceSettings, block_size: int = BLOCK_SIZE, part_rows: int = PART_ROWS
) -> ListPlan:
    """The list's partitions, file after file (read on a worker: only each file's size,
    or its Parquet footer); the kept columns' kinds from the first file."""
    files = list_files(settings)
    if not files:
        raise FileNotFoundError(f"no URL list matches {settings.path}")
    parts = [
        replace(part, path=path)
        for path in files
        for part in _file_parts(replace(settings, path=path), block_size, part_rows)
    ]
    numbered = tuple(replace(part, number=n) for n, part in enumerate(parts))
    return ListPlan(numbered, kept_kinds(replace(settings, path=files[0])))


def _file_parts(settings: SourceSettings, block_size: int, part_rows: int) -> tuple[ListPart, ...]:
    fmt = settings.format or detect_format(settings.path)
    if settings.columns.names and fmt == "txt":
        raise ValueError(f"a .txt list has no columns: {list(settings.columns.names)}")
    if infer_compression(settings.path.split("?", 1)[0]) is not None:
        return (ListPart(0, "whole"),)
    if fmt == "parquet":
        return _row_group_parts(settings, part_rows)
    fs, path = fsspec.core.url_to_fs(settings.path, **settings.storage_options)
    size = fs.size(path)
    starts = range(0, max(size, 1), block_size)
    return tuple(
        ListPart(n, "bytes", start=s, stop=min(s + block_size, size)) for n, s in enumerate(starts)
    )


def _row_group_parts(settings: SourceSettings, part_rows: int) -> tuple[ListPart, ...]:
    import pyarrow.parquet as pq

    with fsspec.open(settings.path, "rb", **settings.storage_options) as f:
        parquet = pq.ParquetFile(f)
    columns = (settings.column, *settings.columns.names)
    _check_columns(columns, parquet.schema_arrow.names, "Parquet schema")  # before any read
    meta = parquet.metadata
    ranges = [
        (group, start, min(start + part_rows, meta.row_group(group).num_rows))
        for group in range(meta.num_row_groups)
        for start in range(0, meta.row_group(group).num_rows, part_rows)
    ]
    return tuple(ListPart(n, "rows", g, a, b) for n, (g, a, b) in enumerate(ranges)) or (
        ListPart(0, "rows"),
    )


def read_list_part(part: ListPart, settings: SourceSettings, done: Done) -> Partition:
    """Read one partition of the list, classify and batch it (on a worker)."""
    rows = part_rows(part, settings)
    return partition_of(rows, settings.columns, settings.batch_size, settings.max_url_length, done)


def part_rows(part: ListPart, settings: SourceSettings) -> Iterator[Row]:
    """Each line's URL and carried values, of one partition."""
    settings = replace(settings, path=part.path or settings.path)
    if part.kind == "whole":
        return read_rows(settings)
    if part.kind == "rows":
        return _row_group_rows(part, settings)
    return _block_rows(part, settings)


def _block_rows(part: ListPart, settings: SourceSettings) -> Iterator[Row]:
    fmt = settings.format or detect_format(settings.path)
    columns = (settings.column, *settings.columns.names)
    with fsspec.open(settings.path, "rb", **settings.storage_options) as f:
        block = read_block(f, part.start, part.stop - part.start, delimiter=b"\n")
        header = b""
        if part.start and fmt in ("csv", "tsv"):  # a later block parses with the header
            f.seek(0)
            header = f.readline()
    readers = {"txt": _read_txt, "csv": _read_delimited, "tsv": _read_delimited}
    return readers.get(fmt, _read_jsonl)(io.BytesIO(header + block), columns, fmt)


def _row_group_rows(part: ListPart, settings: SourceSettings) -> Iterator[Row]:
    import pyarrow.parquet as pq

    columns = (settings.column, *settings.columns.names)
    wanted = list(dict.fromkeys(columns))
    with fsspec.open(settings.path, "rb", **settings.storage_options) as f:
        parquet = pq.ParquetFile(f)
        _check_columns(columns, parquet.schema_arrow.names, "Parquet schema")
        if parquet.metadata.num_row_groups == 0:
            return iter(())
        table = parquet.read_row_group(part.row_group, columns=wanted)
    table = table.slice(part.start, part.stop - part.start)
    values = [table.column(wanted.index(c)).to_pylist() for c in columns]
    return ((_url(row[0]), row[1:]) for row in zip(*values, strict=True))


def read_frame_part(
    frame: Any, names: tuple[str, ...] | None, columns: InputColumns, batch_size: int, done: Done
) -> Partition:
    """One partition of a dask DataFrame (a pandas DataFrame here, with the URL column then
    ``names``; or a Series), classified and batched on the worker that computed it."""
    if names is None:
        rows: Any = ((_url(url), ()) for url in frame.tolist())
    else:
        column, *carried = names
        values = [frame[column].tolist(), *(frame[n].tolist() for n in carried)]
        rows = ((_url(row[0]), row[1:]) for row in zip(*values, strict=True))
    return partition_of(rows, columns, batch_size, None, done)


def partition_of(
    rows: Iterator[Row],
    columns: InputColumns,
    batch_size: int,
    max_url_length: int | None,
    done: Done,
) -> Partition:
    """Classify (repeats found within the partition), batch and mark the resumed entries."""
    carried = ((url, columns.carry(values)) for url, values in rows)
    entries = classify(carried) if max_url_length is None else classify(carried, max_url_length)
    batches = tuple(resume_batch(batch, done) for batch in batched(entries, batch_size))
    return Partition(batches, sum(len(batch.entries) for batch, _ in batches))


def partition_size(partition: Partition) -> tuple[int, int]:
    return partition.size


def placed_batch(partition: Partition, place: BatchPlace) -> tuple[UrlBatch, dict[int, Record]]:
    """One batch of a partition with its input-wide line numbers and batch id."""
    batch, previous = partition.batches[place.number]
    entries = tuple(replace(e, index=e.index + place.offset) for e in batch.entries)
    moved = {index + place.offset: record for index, record in previous.items()}
    return UrlBatch(place.batch_id, entries), moved


def download_part_batch(
    partition: Partition, place: BatchPlace, settings: DownloadSettings
) -> PartDownloaded:
    """The download node of a batch read by the workers."""
    batch, previous = placed_batch(partition, place)
    return PartDownloaded(download_batch(batch, settings), previous)


def thumbnail_part_batch(downloaded: PartDownloaded, job: JobSettings) -> BatchReport:
    """The thumbnail node of a batch read by the workers."""
    return thumbnail_batch(downloaded.downloaded, job, downloaded.previous or None)


def failed_part_batch(
    partition: Partition, place: BatchPlace, error: str, job: JobSettings
) -> BatchReport:
    """A batch whose nodes failed every retry: its rows, written by a worker (the client
    does not hold the batch's entries)."""
    batch, previous = placed_batch(partition, place)
    return record_failed_batch(batch, error, job, previous)
