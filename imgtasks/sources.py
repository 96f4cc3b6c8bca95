"""URL sources: read URL lists lazily, validate and de-duplicate them, cut them into batches.

Formats, each optionally gzip'd (``.gz``), from a local path or any fsspec URL:

- ``.txt``: one URL per line; blank lines and ``#`` comments are skipped;
- ``.csv`` / ``.tsv``: a header row, URLs in column ``url`` (configurable);
- ``.parquet``: column ``url`` (configurable), read one row group slice at a time;
- ``.jsonl``: one JSON object per line, key ``url`` (configurable).

Nothing here holds the whole list: every reader is a generator, and de-duplication keeps
only an 8-byte hash per URL in a compact open-addressing table (16 bytes per URL).
A malformed entry never raises: it becomes an ``invalid_url`` entry; a repeat of an
earlier URL becomes a ``duplicate`` entry pointing at the same output.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from imgtasks.download import validate_url
from imgtasks.status import Status

log = logging.getLogger(__name__)

FORMATS = ("txt", "csv", "tsv", "parquet", "jsonl")
DEFAULT_COLUMN = "url"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_URL_LENGTH = 2048

PENDING = "pending"  # an entry's state before its fetch; not a manifest status
INVALID_URL = Status.INVALID_URL
DUPLICATE = Status.DUPLICATE


@dataclass(frozen=True)
class SourceSettings:
    """Where the URL list is and how to read it."""

    path: str
    column: str = DEFAULT_COLUMN
    format: str | None = None  # None: from the file name (``.csv.gz`` -> ``csv``)
    batch_size: int = DEFAULT_BATCH_SIZE
    max_url_length: int = DEFAULT_MAX_URL_LENGTH
    storage_options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"unknown URL list format {self.format!r}; use one of {FORMATS}")
        if self.max_url_length < 16:
            raise ValueError(f"max URL length must be >= 16, got {self.max_url_length}")


@dataclass(frozen=True)
class UrlEntry:
    """One line of the input: its position, the URL, and whether it is to be fetched."""

    index: int
    url: str
    status: str = PENDING  # PENDING, INVALID_URL or DUPLICATE
    error: str = ""

    @property
    def pending(self) -> bool:
        return self.status == PENDING


@dataclass(frozen=True)
class UrlBatch:
    """A run of consecutive entries; the unit of work for one download and one thumbnail node."""

    batch_id: int
    entries: tuple[UrlEntry, ...]

    @property
    def pending_urls(self) -> list[str]:
        return [e.url for e in self.entries if e.pending]


def detect_format(path: str) -> str:
    """The list format from the file name, ignoring a compression suffix."""
    name = path.split("?", 1)[0].lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    ext = name.rsplit(".", 1)[-1] if "." in name.rsplit("/", 1)[-1] else ""
    if ext in ("ndjson", "json"):
        return "jsonl"
    if ext in ("text", "list", "lst", ""):
        return "txt"
    if ext not in FORMATS:
        raise ValueError(f"cannot tell the format of {path!r}: use one of {FORMATS} or pass it")
    return ext


def read_urls(settings: SourceSettings) -> Iterator[str]:
    """Yield the raw URL strings of a list, lazily, in file order."""
    fmt = settings.format or detect_format(settings.path)
    reader = {
        "txt": _read_txt,
        "csv": _read_delimited,
        "tsv": _read_delimited,
        "parquet": _read_parquet,
        "jsonl": _read_jsonl,
    }[fmt]
    with fsspec.open(settings.path, "rb", compression="infer", **settings.storage_options) as f:
        yield from reader(f, settings.column, fmt)


def _text(f: io.IOBase) -> io.TextIOWrapper:
    # errors="replace": a stray byte must become an invalid URL, not a crash.
    return io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")


def _read_txt(f: io.IOBase, column: str, fmt: str) -> Iterator[str]:
    for line in _text(f):
        text = line.strip()
        if text and not text.startswith("#"):
            yield text


def _read_delimited(f: io.IOBase, column: str, fmt: str) -> Iterator[str]:
    rows = csv.reader(_text(f), delimiter="\t" if fmt == "tsv" else ",")
    header = next(rows, None)
    if header is None:
        return
    names = [h.strip() for h in header]
    if column not in names:
        raise ValueError(f"column {column!r} not in the {fmt} header {names}")
    at = names.index(column)
    for row in rows:
        if not row:
            continue
        yield row[at].strip() if at < len(row) else ""


def _read_jsonl(f: io.IOBase, column: str, fmt: str) -> Iterator[str]:
    for line in _text(f):
        text = line.strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            yield text  # not JSON: recorded as an invalid URL, the run goes on
            continue
        value = obj.get(column) if isinstance(obj, dict) else None
        yield value.strip() if isinstance(value, str) else ""


def _read_parquet(f: io.IOBase, column: str, fmt: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # heavy import: only when a Parquet list is read

    parquet = pq.ParquetFile(f)
    if column not in parquet.schema_arrow.names:
        raise ValueError(
            f"column {column!r} not in the Parquet schema {parquet.schema_arrow.names}"
        )
    for record_batch in parquet.iter_batches(batch_size=65536, columns=[column]):
        for value in record_batch.column(0).to_pylist():
            yield value.strip() if isinstance(value, str) else ""


class SeenSet:
    """A set of URLs kept as 64-bit hashes in a numpy open-addressing table.

    16 bytes per URL at the maximum load of 1/2 (a Python set of str costs ~100+), so
    100 million URLs fit in ~1.6 GB. Two different URLs share a hash with probability
    ~n^2/2^65 (about 3e-4 for 10^8 URLs): the second would be reported as a duplicate.
    """

    def __init__(self, capacity: int = 1 << 16) -> None:
        size = 1 << max(4, (capacity * 2 - 1).bit_length())
        self._table = np.zeros(size, dtype=np.uint64)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @staticmethod
    def key(url: str) -> int:
        digest = hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little") or 1  # 0 marks an empty slot

    def add(self, url: str) -> bool:
        """Add a URL; True if it was new."""
        if (self._count + 1) * 2 > len(self._table):
            self._grow()
        return self._insert(self._table, self.key(url))

    def __contains__(self, url: str) -> bool:
        table, key = self._table, self.key(url)
        mask = len(table) - 1
        slot = key & mask
        while True:
            here = int(table[slot])
            if here == key:
                return True
            if here == 0:
                return False
            slot = (slot + 1) & mask

    def _insert(self, table: np.ndarray, key: int) -> bool:
        mask = len(table) - 1
        slot = key & mask
        while True:
            here = int(table[slot])
            if here == key:
                return False
            if here == 0:
                table[slot] = key
                self._count += 1
                return True
            slot = (slot + 1) & mask

    def _grow(self) -> None:
        old = self._table[self._table != 0]
        self._table = np.zeros(len(self._table) * 2, dtype=np.uint64)
        self._count = 0
        for key in old.tolist():
            self._insert(self._table, key)


def classify(
    urls: Iterable[str], max_url_length: int = DEFAULT_MAX_URL_LENGTH
) -> Iterator[UrlEntry]:
    """Number the URLs and mark the invalid ones and the repeats."""
    seen = SeenSet()
    for index, url in enumerate(urls):
        problem = validate_url(url, max_url_length)
        if problem is not None:
            yield UrlEntry(index, url, INVALID_URL, problem)
        elif not seen.add(url):
            yield UrlEntry(index, url, DUPLICATE, "URL seen earlier in this run")
        else:
            yield UrlEntry(index, url)


def batched(entries: Iterable[UrlEntry], batch_size: int) -> Iterator[UrlBatch]:
    """Group entries into batches of ``batch_size`` URLs to fetch.

    Invalid and duplicate entries ride along with the batch they fall in (they cost no
    work), so every batch carries up to ``batch_size`` real downloads.
    """
    chunk: list[UrlEntry] = []
    pending = 0
    batch_id = 0
    for entry in entries:
        chunk.append(entry)
        pending += entry.pending
        if pending >= batch_size or len(chunk) >= 8 * batch_size:
            yield UrlBatch(batch_id, tuple(chunk))
            batch_id += 1
            chunk, pending = [], 0
    if chunk:
        yield UrlBatch(batch_id, tuple(chunk))


def url_batches(settings: SourceSettings) -> Iterator[UrlBatch]:
    """The whole source stage: read, classify, batch; lazily."""
    return batched(classify(read_urls(settings), settings.max_url_length), settings.batch_size)
