"""The task functions of the graph: plain typed functions, no dask.

``flows/`` wraps them with ``dask.delayed``: one download node per batch feeding one
thumbnail node that writes the batch's thumbnails and manifest part. Both are idempotent
(same inputs, same files), so Dask may rerun them after a lost worker.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from imgtasks import memtrim
from imgtasks.download import DownloadResult, DownloadSettings, fetch_many, host_concurrency
from imgtasks.manifest import (
    KeptColumns,
    Record,
    kept_schema,
    manifest_relpath,
    read_part,
    record_of,
    write_manifest_part,
)
from imgtasks.shards import ShardPiece, ShardSettings, write_shard
from imgtasks.sinks import OutputSettings, file_exists, output_relpath, write_file
from imgtasks.sources import UrlBatch, UrlEntry
from imgtasks.stagecpu import counted
from imgtasks.status import DOWNLOAD, NETWORK, SOURCE, Status
from imgtasks.thumbnail import Thumbnail, ThumbSettings, make_thumbnail

log = logging.getLogger(__name__)

ORIGINAL_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "MPO": "jpg"}
# The I/O worker's download threads free memory into glibc's arenas, which keep it: a
# trim after a batch, at most every 2 s, gives it back. 100k tiny images at 0 ms through
# the flow, the I/O worker's RSS after 30-130 s: 137-146 MiB without, 122-134 with (one
# run each, /tmp scratch monitor). It still creeps (~+10 MiB per 100k URLs either way);
# Python's own allocations stay flat (sys.getallocatedblocks), so what creeps is native.
TRIM_INTERVAL_S = 2.0
RESUMED = "resumed"  # entry status: finished by an earlier run; its manifest row is kept


@dataclass(frozen=True)
class DownloadedBatch:
    """A batch with one download result per entry (None where nothing was fetched)."""

    batch: UrlBatch
    results: tuple[DownloadResult | None, ...]
    wall_s: float = 0.0
    # the I/O process's limit and requests in flight for the batch's hosts, at its end
    hosts: Mapping[str, tuple[float, int]] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class BatchReport:
    """What a thumbnail node did: small, so the client can gather millions of them."""

    batch_id: int
    manifest_path: str
    counts: Mapping[str, int] = field(hash=False)
    entries: int = 0
    resumed: int = 0  # entries carried over from an earlier run, not fetched again
    bytes_in: int = 0
    download_s: float = 0.0  # summed over URLs
    thumbnail_s: float = 0.0  # summed over URLs
    download_wall_s: float = 0.0
    thumbnail_wall_s: float = 0.0
    # The thumbnail node's own CPU (its thread's): what batch sizes are measured by, as
    # wall time also counts the waits for a core that a loaded machine adds.
    thumbnail_cpu_s: float = 0.0
    # Download failures by host, and network failures (DNS, refused, timed out) by their
    # error: the client spots an error storm and names the hosts behind it.
    failed_hosts: Mapping[str, int] = field(default_factory=dict, hash=False)
    network_errors: Mapping[str, int] = field(default_factory=dict, hash=False)
    # Per-host concurrency as the batch ended (DownloadedBatch.hosts): host -> (limit of
    # the I/O process that fetched it, its requests in flight). The job page charts it.
    host_limits: Mapping[str, tuple[float, int]] = field(default_factory=dict, hash=False)

    @property
    def ok(self) -> int:
        return self.counts.get(Status.OK, 0)


@dataclass(frozen=True)
class JobSettings:
    """Everything the thumbnail node needs besides its batch."""

    thumb: ThumbSettings
    output: OutputSettings
    run_id: str
    originals: OutputSettings | None = None  # also keep the downloaded files there
    kept: KeptColumns = ()  # the input columns kept in the manifest, with their types
    keep_names: tuple[str, ...] = ()  # InputColumns.keep: the order of UrlEntry.carried.kept
    shards: ShardSettings | None = None  # None: thumbnail files; else packed into shards

    def __post_init__(self) -> None:
        kept_schema(self.kept)  # a kept column named like a manifest column: before any work

    def with_input(self, record: Record, entry: UrlEntry) -> Record:
        """The record with what its input row carries: caption and kept columns."""
        carried = entry.carried
        kept = tuple(zip(self.keep_names, carried.kept, strict=True))
        return replace(record, index=entry.index, caption=carried.caption, kept=kept)


def call_packed(blob: bytes, *more: Any) -> Any:
    """Call the function pickled in ``blob`` with its pickled arguments, then ``more``
    (the outputs of upstream nodes). The orchestration pickles a node and its arguments
    into one bytes object so the scheduler never unpickles a batch's URLs."""
    fn, args, kwargs = pickle.loads(blob)
    return fn(*args, *more, **kwargs)


def download_batch(batch: UrlBatch, settings: DownloadSettings) -> DownloadedBatch:
    """Fetch every pending URL of the batch concurrently."""
    start = time.perf_counter()
    memtrim.one_arena()  # before the first call starts the download threads
    with counted("download node"):
        fetched = iter(fetch_many(batch.pending_urls, settings))
        results = tuple(next(fetched) if entry.pending else None for entry in batch.entries)
        hosts = host_concurrency(batch.pending_urls, settings)
    memtrim.trim_every(TRIM_INTERVAL_S)
    return DownloadedBatch(batch, results, time.perf_counter() - start, hosts)


def resume_batch(batch: UrlBatch, done: Mapping[str, Record]) -> tuple[UrlBatch, dict[int, Record]]:
    """Mark the entries finished by an earlier run as ``resumed``, with their old rows."""
    previous = {e.index: done[e.url] for e in batch.entries if e.pending and e.url in done}
    if not previous:
        return batch, {}
    entries = tuple(replace(e, status=RESUMED) if e.index in previous else e for e in batch.entries)
    return UrlBatch(batch.batch_id, entries), previous


def thumbnail_batch(
    downloaded: DownloadedBatch, job: JobSettings, previous: Mapping[int, Record] | None = None
) -> BatchReport:
    """Make, write and record the thumbnails of one downloaded batch.

    ``previous`` holds the rows of entries resumed from an earlier run: carried over, so
    the new manifest still has one current row per URL.
    """
    with counted("thumbnail node"):
        return _thumbnail_batch(downloaded, job, previous or {})


def _thumbnail_batch(
    downloaded: DownloadedBatch, job: JobSettings, previous: Mapping[int, Record]
) -> BatchReport:
    start, cpu_start = time.perf_counter(), time.thread_time()
    records = [
        job.with_input(previous[entry.index], entry)
        if entry.status == RESUMED
        else isolated_record(entry, result, job)
        for entry, result in zip(downloaded.batch.entries, downloaded.results, strict=True)
    ]
    with counted("manifest part"):
        manifest = write_manifest_part(
            job.output, job.run_id, downloaded.batch.batch_id, records, job.kept
        )
    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    log.debug("batch %d: %d entries in %.3f s", downloaded.batch.batch_id, len(records), wall)
    return batch_report(
        downloaded.batch.batch_id,
        manifest,
        records,
        resumed=len(previous),
        download_wall_s=downloaded.wall_s,
        thumbnail_wall_s=wall,
        thumbnail_cpu_s=cpu,
        host_limits=downloaded.hosts,
    )


@dataclass(frozen=True)
class ShardedBatch:
    """A thumbnail node's output in shard mode: the piece its shard writer takes, and the
    report the client tallies (fetched alone, so the thumbnails stay on the worker)."""

    piece: ShardPiece
    report: BatchReport


def thumbnail_piece(downloaded: DownloadedBatch, job: JobSettings) -> ShardedBatch:
    """Make the thumbnails of one downloaded batch and hold them, with the rows, for the
    batch's shard; the originals are dropped here."""
    start, cpu_start = time.perf_counter(), time.thread_time()
    samples = [
        isolated_sample(entry, result, job)
        for entry, result in zip(downloaded.batch.entries, downloaded.results, strict=True)
    ]
    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    records = tuple(record for record, _ in samples)
    batch_id = downloaded.batch.batch_id
    began = time.time() - wall - downloaded.wall_s
    piece = ShardPiece(batch_id, records, tuple(image for _, image in samples), began)
    report = batch_report(
        batch_id,
        "",
        list(records),
        download_wall_s=downloaded.wall_s,
        thumbnail_wall_s=wall,
        thumbnail_cpu_s=cpu,
        host_limits=downloaded.hosts,
    )
    return ShardedBatch(piece, report)


def report_of(sharded: ShardedBatch) -> BatchReport:
    return sharded.report


def failed_piece(batch: UrlBatch, error: str, job: JobSettings) -> ShardedBatch:
    """A batch whose node failed every retry, as its shard writer takes it: its rows only."""
    records = tuple(failed_batch_records(batch, error, job))
    piece = ShardPiece(batch.batch_id, records, (None,) * len(records), time.time())
    return ShardedBatch(piece, batch_report(batch.batch_id, "", list(records)))


def shard_node(shard_id: int, batches: list[ShardedBatch], job: JobSettings) -> dict:
    """Write one shard from its batches' pieces; returns its stats."""
    assert job.shards is not None
    pieces = [b.piece for b in batches]
    return write_shard(shard_id, pieces, job.output, job.shards, job.thumb.ext, job.kept)


def batch_report(
    batch_id: int,
    manifest: str,
    records: list[Record],
    resumed: int = 0,
    host_limits: Mapping[str, tuple[float, int]] | None = None,
    **walls: float,
) -> BatchReport:
    return BatchReport(
        batch_id=batch_id,
        manifest_path=manifest,
        counts=dict(Counter(str(r.status) for r in records)),  # plain str: small to ship
        resumed=resumed,
        entries=len(records),
        bytes_in=sum(r.bytes for r in records),
        download_s=sum(r.download_s for r in records),
        thumbnail_s=sum(r.thumbnail_s for r in records),
        failed_hosts=dict(Counter(host_of(r.url) for r in records if r.status in FETCH_FAILURES)),
        network_errors=dict(
            Counter(f"{r.status}: {r.error[:120]}" for r in records if r.status in NETWORK)
        ),
        host_limits=dict(host_limits or {}),
        **walls,
    )


FETCH_FAILURES = DOWNLOAD - SOURCE


def host_of(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def record_failed_batch(
    batch: UrlBatch, error: str, job: JobSettings, previous: Mapping[int, Record] | None = None
) -> BatchReport:
    """Write the rows of a batch whose node failed on every retry, so the manifest stays
    complete (``--resume`` fetches its URLs again). A part the node managed to write
    before it was lost is complete (written atomically) and kept."""
    relpath = manifest_relpath(job.run_id, batch.batch_id)
    if file_exists(job.output, relpath):
        records = [record_of(row) for row in read_part(job.output, relpath).to_pylist()]
    else:
        records = failed_batch_records(batch, error, job, previous)
        write_manifest_part(job.output, job.run_id, batch.batch_id, records, job.kept)
    return batch_report(batch.batch_id, relpath, records, resumed=len(previous or {}))


def isolated_record(entry: UrlEntry, result: DownloadResult | None, job: JobSettings) -> Record:
    return isolated_sample(entry, result, job)[0]


def isolated_sample(entry: UrlEntry, result: DownloadResult | None, job: JobSettings) -> Sample:
    """``entry_sample``, with any unexpected exception turned into this URL's own row:
    one URL's bug costs that URL, never the rest of its batch."""
    try:
        record, image = entry_sample(entry, result, job)
    except Exception as exc:  # a bug, or a library failing in a way nobody classified
        log.exception("internal error on %s", entry.url)
        error = f"{type(exc).__name__}: {exc}"
        record, image = Record(entry.index, entry.url, Status.INTERNAL_ERROR, error), None
    return job.with_input(record, entry), image


def failed_batch_records(
    batch: UrlBatch, error: str, job: JobSettings, previous: Mapping[int, Record] | None = None
) -> list[Record]:
    """The rows of a batch whose node failed for good: ``batch_failed`` for every URL it
    was to fetch; sources' verdicts and resumed rows as the node would have written them."""
    previous = previous or {}
    return [
        job.with_input(
            previous[e.index]
            if e.index in previous
            else Record(e.index, e.url, Status.BATCH_FAILED, error)
            if e.pending or e.status == RESUMED
            else entry_record(e, None, job),
            e,
        )
        for e in batch.entries
    ]


def entry_record(entry: UrlEntry, result: DownloadResult | None, job: JobSettings) -> Record:
    """The manifest row of one entry, writing its thumbnail when there is one."""
    return entry_sample(entry, result, job)[0]


Sample = tuple[Record, bytes | None]  # a row, and its thumbnail when it goes into a shard


def entry_sample(entry: UrlEntry, result: DownloadResult | None, job: JobSettings) -> Sample:
    """The manifest row of one entry; its thumbnail written as a file, or returned for its
    shard."""
    if result is None:  # invalid or duplicate: nothing fetched
        duplicate = entry.status == Status.DUPLICATE and job.shards is None
        path = output_relpath(entry.url, job.thumb.ext) if duplicate else ""
        return Record(entry.index, entry.url, entry.status, entry.error, path=path), None
    if not result.ok or result.content is None:
        return _download_record(entry, result, result.status, result.error), None
    if entry.carried.sha256 and hashlib.sha256(result.content).hexdigest() != entry.carried.sha256:
        return _download_record(entry, result, Status.HASH_MISMATCH, _mismatch(entry)), None
    return _thumbnail_sample(entry, result, result.content, job)


def _mismatch(entry: UrlEntry) -> str:
    return f"the body's sha256 is not the expected {entry.carried.sha256[:80]}"


def _thumbnail_sample(
    entry: UrlEntry, result: DownloadResult, content: bytes, job: JobSettings
) -> Sample:
    with counted("make_thumbnail"):
        thumb = make_thumbnail(content, job.thumb)
    with counted("sha256"):
        sha256 = hashlib.sha256(content).hexdigest()
    fields = {
        "bytes": len(content),
        "sha256": sha256,
        "http_status": result.http_status or 0,
        "download_s": result.network_s,
        "thumbnail_s": thumb.elapsed_s,
        "orig_width": thumb.orig_width,
        "orig_height": thumb.orig_height,
        "source_format": thumb.source_format,
    }
    status, error = thumb.status, thumb.error
    if job.originals is not None:
        ext = ORIGINAL_EXTENSIONS.get(thumb.source_format, "bin")
        fields["original_path"], error = _keep_original(
            entry.url, content, ext, job.originals, error
        )
    if not thumb.ok:
        return Record(entry.index, entry.url, status, error, **fields), None  # type: ignore[arg-type]
    fields |= {"width": thumb.width, "height": thumb.height}
    fields |= {"phash": thumb.phash, "encoding": thumb.encoding}
    if job.shards is not None:  # held for the shard writer
        return Record(entry.index, entry.url, status, error, **fields), thumb.data  # type: ignore[arg-type]
    with counted("thumbnail file"):
        status, error, fields["path"] = _write_thumbnail(entry.url, thumb, job)
    return Record(entry.index, entry.url, status, error, **fields), None  # type: ignore[arg-type]


def _download_record(entry: UrlEntry, result: DownloadResult, status: str, error: str) -> Record:
    """The row of a URL whose body is not kept: what the download said, and nothing more."""
    body = result.content or b""
    return Record(
        entry.index,
        entry.url,
        status,
        error,
        bytes=len(body),
        sha256=hashlib.sha256(body).hexdigest() if body else "",
        http_status=result.http_status or 0,
        download_s=result.network_s,
    )


def _write_thumbnail(url: str, thumb: Thumbnail, job: JobSettings) -> tuple[str, str, str]:
    path = output_relpath(url, job.thumb.ext)
    try:
        write_file(job.output, path, thumb.data or b"")
    except OSError as exc:  # disk full, permissions, object store refusing
        log.warning("cannot write %s: %s", path, exc)
        return Status.WRITE_ERROR, f"cannot write thumbnail: {exc}", ""
    return Status.OK, "", path


def _keep_original(
    url: str, content: bytes, ext: str, where: OutputSettings, error: str
) -> tuple[str, str]:
    path = output_relpath(url, ext)
    try:
        write_file(where, path, content)
    except OSError as exc:
        log.warning("cannot keep original %s: %s", path, exc)
        return "", (error + "; " if error else "") + f"cannot keep original: {exc}"
    return path, error
