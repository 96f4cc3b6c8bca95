"""Shards: the thumbnails of consecutive input lines packed for training data loaders.

Layout under the output root, as img2dataset writes it (code written for its datasets
reads ours)::

    00000.tar            webdataset: <key>.jpg (png/webp), <key>.json, <key>.txt (caption)
    00000.parquet        one row per input line of the shard, failures included;
                         the parquet format: the image bytes in a column named like the
                         extension (``jpg``), null where there is no thumbnail
    00000_stats.json     count, successes, failed_to_download, failed_to_resize,
                         status_dict, our counts per status, start, end, duration: last

The rows (the shard parquet and each sample's ``.json``) speak img2dataset's vocabulary
where it has a word for ours, so a filter written for its datasets
(``df[df.status == "success"]``, ``error_message``, ``original_width``) works unchanged:
``status`` is ``success``, ``failed_to_download`` or ``failed_to_resize``, and our finer
status (``http_4xx``, ``decode_error``, ...) is ``imgtasks_status`` beside it.

Shard ``s`` holds input lines ``s * size`` to ``(s + 1) * size - 1``; a line's key is
``s * 10**ceil(log10(size)) + row``, zero-padded (``000010005``: shard 1, row 5 for
10,000 per shard). Every file is written atomically (a temporary name renamed, or one PUT
on object stores) and the stats file last, so a shard whose stats file exists is whole,
and one without it is redone whole (so is a shard holding a batch that failed every retry:
its files are written, its stats file is not). Plain functions: no dask here.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imgtasks.manifest import KeptColumns, Record, column_array, manifest_row, records_table
from imgtasks.sinks import OutputSettings, filesystem, write_file
from imgtasks.status import THUMBNAIL, Status

FORMATS = ("webdataset", "parquet")
DEFAULT_SHARD_SIZE = 10_000  # img2dataset's number_sample_per_shard
STATS_SUFFIX = "_stats.json"
# Our manifest's column names -> img2dataset's, for the rows written into shards.
PEER_NAMES = {
    "status": "imgtasks_status",
    "error": "error_message",
    "orig_width": "original_width",
    "orig_height": "original_height",
}
SUCCESS, FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE = "success", "failed_to_download", "failed_to_resize"


@dataclass(frozen=True)
class ShardSettings:
    """How thumbnails are packed: ``webdataset`` tars or ``parquet`` files of ``size`` lines."""

    format: str = "webdataset"
    size: int = DEFAULT_SHARD_SIZE

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"shard format must be one of {FORMATS}; got {self.format!r}")
        if not (isinstance(self.size, int) and self.size >= 1):
            raise ValueError(f"shard size must be a positive integer; got {self.size!r}")

    def shard_of(self, index: int) -> int:
        return index // self.size

    def key(self, index: int) -> str:
        """img2dataset's key: shard number and row, zero-padded to 5 + digits of a row."""
        digits = math.ceil(math.log10(self.size))
        shard, row = divmod(index, self.size)
        return f"{shard * 10**digits + row:0{5 + digits}d}"


@dataclass(frozen=True)
class ShardPiece:
    """One batch's rows and thumbnails (None where there is none), waiting for its shard."""

    batch_id: int
    records: tuple[Record, ...]
    images: tuple[bytes | None, ...]
    started: float = 0.0  # wall clock (time.time) when the batch's download began


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def stats_relpath(shard_id: int) -> str:
    return f"{shard_name(shard_id)}{STATS_SUFFIX}"


def finished_shards(output: OutputSettings) -> dict[int, dict[str, Any]]:
    """The shards a run finished (their stats file exists), with their stats."""
    fs, root = filesystem(output)
    if not fs.exists(root):
        return {}
    done = {}
    for path in fs.ls(root, detail=False):
        name = path.rsplit("/", 1)[-1]
        if name.endswith(STATS_SUFFIX) and name[: -len(STATS_SUFFIX)].isdigit():
            with fs.open(path, "rb") as f:
                done[int(name[: -len(STATS_SUFFIX)])] = json.load(f)
    return done


def shard_files(output: OutputSettings) -> list[str]:
    """Paths (relative to the root) of every finished shard's parquet, in shard order."""
    return [f"{shard_name(s)}.parquet" for s in sorted(finished_shards(output))]


def write_shard(
    shard_id: int,
    pieces: Sequence[ShardPiece],
    output: OutputSettings,
    shards: ShardSettings,
    ext: str,
    kept: KeptColumns = (),
) -> dict[str, Any]:
    """Write one shard's files, its stats file last; returns the stats."""
    records = [r for piece in sorted(pieces, key=lambda p: p.batch_id) for r in piece.records]
    images = [i for piece in sorted(pieces, key=lambda p: p.batch_id) for i in piece.images]
    keys = [shards.key(r.index) for r in records]
    table = peer_table(records_table(records, kept), keys)
    name = shard_name(shard_id)
    if shards.format == "webdataset":
        write_file(output, f"{name}.tar", tar_bytes(keys, records, images, ext, kept))
    else:
        table = table.append_column(ext, column_array(images, pa.binary()))
    write_file(output, f"{name}.parquet", parquet_bytes(table))
    stats = shard_stats(records, min((p.started for p in pieces), default=time.time()))
    if Status.BATCH_FAILED in stats["counts"]:
        return stats  # its rows are there to read, but unfinished: --resume redoes it whole
    write_file(output, stats_relpath(shard_id), json.dumps(stats, indent=4).encode())
    return stats


def peer_status(status: str) -> str:
    """img2dataset's word for one of our statuses: a failure of the image itself is
    failed_to_resize, any other failure (the URL, the fetch, the flow) failed_to_download."""
    if status == Status.OK:
        return SUCCESS
    return FAILED_TO_RESIZE if status in THUMBNAIL else FAILED_TO_DOWNLOAD


def peer_table(table: pa.Table, keys: Sequence[str]) -> pa.Table:
    """Manifest rows as img2dataset names them: key first, its status beside ours."""
    ours = table.column("status").to_pylist()
    table = table.rename_columns([PEER_NAMES.get(name, name) for name in table.column_names])
    table = table.add_column(0, "key", column_array(keys, pa.string()))
    at = table.column_names.index("imgtasks_status")
    return table.add_column(at, "status", column_array([peer_status(s) for s in ours], pa.string()))


def manifest_view(frame: Any) -> Any:
    """Shard rows (pandas or dask) back in the manifest's own names and statuses."""
    frame = frame.drop(columns=["status"])
    return frame.rename(columns={peer: ours for ours, peer in PEER_NAMES.items()})


def shard_stats(records: Iterable[Record], started: float) -> dict[str, Any]:
    counts = Counter(str(r.status) for r in records)
    peers = Counter(peer_status(s) for s in counts.elements())
    end = time.time()
    return {
        "count": sum(counts.values()),
        "successes": counts.get(Status.OK, 0),
        "failed_to_download": peers[FAILED_TO_DOWNLOAD],
        "failed_to_resize": peers[FAILED_TO_RESIZE],
        "failed": sum(n for s, n in counts.items() if s != Status.OK),
        # img2dataset's key: n per outcome ("success" or what went wrong)
        "status_dict": {(SUCCESS if s == Status.OK else s): n for s, n in sorted(counts.items())},
        "counts": dict(sorted(counts.items())),
        "start_time": started,
        "end_time": end,
        "duration": end - started,
    }


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def tar_bytes(
    keys: Sequence[str],
    records: Sequence[Record],
    images: Sequence[bytes | None],
    ext: str,
    kept: KeptColumns,
) -> bytes:
    """The webdataset tar: a sample per thumbnail, its members side by side."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, record, image in zip(keys, records, images, strict=True):
            if image is None:
                continue  # failures are rows of the parquet, not samples
            _add(tar, f"{key}.{ext}", image)
            _add(tar, f"{key}.json", sample_json(key, record, kept))
            if record.caption:
                _add(tar, f"{key}.txt", record.caption.encode("utf-8", "backslashreplace"))
    return buffer.getvalue()


def sample_json(key: str, record: Record, kept: KeptColumns) -> bytes:
    """A sample's metadata: its manifest row (kept columns included) and its key."""
    row = manifest_row(record, kept)
    row = {PEER_NAMES.get(name, name): value for name, value in row.items()}
    row = {"key": key, "status": peer_status(record.status), **row}
    return json.dumps(row, indent=4, ensure_ascii=False, default=_plain).encode("utf-8")


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and value != value else str(value)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # the same inputs make the same bytes: a rerun after a lost worker
    tar.addfile(info, io.BytesIO(data))


def shard_counts(stats: Mapping[str, Any]) -> dict[str, int]:
    return {str(k): int(v) for k, v in stats.get("counts", {}).items()}
