"""URL sources: read URL lists lazily, validate and de-duplicate them, cut them into batches.

Formats, each optionally gzip'd (``.gz``), from a local path or any fsspec URL:

- ``.txt``: one URL per line; blank lines and ``#`` comments are skipped;
- ``.csv`` / ``.tsv``: a header row, URLs in column ``url`` (configurable);
- ``.parquet``: column ``url`` (configurable), read one row group slice at a time;
- ``.jsonl``: one JSON object per line, key ``url`` (configurable).

Besides the URL, csv/tsv/parquet/jsonl lists (and DataFrames, through the API) can carry
other columns through to the outputs (:class:`Carried`): a caption, columns kept as they
are, and a sha256 of the expected bytes.

Nothing here holds the whole list: every reader is a generator, and de-duplication keeps
an 8-byte hash per URL, the latest 32,768 in memory and the older ones in a temporary
SQLite file (:class:`SeenSet`): its memory stays the same from 10k to billions of URLs.
A malformed entry never raises: it becomes an ``invalid_url`` entry; a repeat of an
earlier URL becomes a ``duplicate`` entry pointing at the same output.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import sqlite3
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
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
class InputColumns:
    """The input columns carried to the outputs besides the URL."""

    caption: str | None = None  # into the manifest's caption column, .txt and .json
    keep: tuple[str, ...] = ()  # into the manifest and .json as columns of their own
    verify_hash: str | None = None  # a sha256 of the expected bytes: a mismatch is refused

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", tuple(dict.fromkeys(self.keep)))
        if any(not name for name in self.keep) or "" in (self.caption, self.verify_hash):
            raise ValueError("column names must not be empty")

    @property
    def names(self) -> tuple[str, ...]:
        """Every column to read besides the URL, in a fixed order, each once."""
        named = [self.caption, *self.keep, self.verify_hash]
        return tuple(dict.fromkeys(n for n in named if n is not None))

    def carry(self, values: tuple[Any, ...]) -> Carried:
        """What one input row carries, from its values of :attr:`names`."""
        if not values:
            return NOTHING
        by_name = dict(zip(self.names, values, strict=True))
        caption = by_name.get(self.caption) if self.caption else None
        digest = by_name.get(self.verify_hash) if self.verify_hash else None
        return Carried(
            caption=caption if isinstance(caption, str) else _text_of(caption),
            kept=tuple(by_name[n] for n in self.keep),
            sha256=digest.strip().lower() if isinstance(digest, str) else "",
        )


def _text_of(value: Any) -> str:
    # A missing caption (None, NaN) is no caption; a number is written as text.
    if value is None or value != value:
        return ""
    return str(value)


@dataclass(frozen=True)
class Carried:
    """What an input row carries besides its URL."""

    caption: str = ""
    kept: tuple[Any, ...] = ()  # the values of InputColumns.keep, in order
    sha256: str = ""  # expected sha256 (lower-case hex) of the body; "" when not checked


NOTHING = Carried()
NO_COLUMNS = InputColumns()


@dataclass(frozen=True)
class SourceSettings:
    """Where the URL list is and how to read it."""

    path: str
    column: str = DEFAULT_COLUMN
    format: str | None = None  # None: from the file name (``.csv.gz`` -> ``csv``)
    batch_size: int = DEFAULT_BATCH_SIZE
    max_url_length: int = DEFAULT_MAX_URL_LENGTH
    columns: InputColumns = NO_COLUMNS
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
    carried: Carried = NOTHING

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


Row = tuple[str, tuple[Any, ...]]  # a URL and its values of InputColumns.names


def read_urls(settings: SourceSettings) -> Iterator[str]:
    """Yield the raw URL strings of a list, lazily, in file order."""
    return (url for url, _ in read_rows(settings))


def read_rows(settings: SourceSettings) -> Iterator[Row]:
    """Yield each line's URL with its values of the carried columns, lazily, in file order."""
    fmt = settings.format or detect_format(settings.path)
    reader = {
        "txt": _read_txt,
        "csv": _read_delimited,
        "tsv": _read_delimited,
        "parquet": _read_parquet,
        "jsonl": _read_jsonl,
    }[fmt]
    names = settings.columns.names
    if names and fmt == "txt":
        raise ValueError(f"a .txt list has no columns: {list(names)} need csv/tsv/parquet/jsonl")
    with fsspec.open(settings.path, "rb", compression="infer", **settings.storage_options) as f:
        yield from reader(f, (settings.column, *names), fmt)


def _text(f: io.IOBase) -> io.TextIOWrapper:
    # errors="replace": a stray byte must become an invalid URL, not a crash.
    return io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")


def _url(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _read_txt(f: io.IOBase, columns: tuple[str, ...], fmt: str) -> Iterator[Row]:
    for line in _text(f):
        text = line.strip()
        if text and not text.startswith("#"):
            yield text, ()


def _read_delimited(f: io.IOBase, columns: tuple[str, ...], fmt: str) -> Iterator[Row]:
    rows = csv.reader(_text(f), delimiter="\t" if fmt == "tsv" else ",")
    header = next(rows, None)
    if header is None:
        return
    names = [h.strip() for h in header]
    _check_columns(columns, names, f"{fmt} header")
    at = [names.index(c) for c in columns]
    for row in rows:
        if not row:
            continue
        values = [row[i] if i < len(row) else None for i in at]
        yield _url(values[0]), tuple(values[1:])


def _check_columns(columns: tuple[str, ...], names: list[str], fmt: str) -> None:
    for column in columns:
        if column not in names:
            raise ValueError(f"column {column!r} not in the {fmt} {names}")


def _read_jsonl(f: io.IOBase, columns: tuple[str, ...], fmt: str) -> Iterator[Row]:
    for line in _text(f):
        text = line.strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            # not JSON: recorded as an invalid URL, the run goes on
            yield text, (None,) * (len(columns) - 1)
            continue
        obj = obj if isinstance(obj, dict) else {}
        yield _url(obj.get(columns[0])), tuple(obj.get(c) for c in columns[1:])


def _read_parquet(f: io.IOBase, columns: tuple[str, ...], fmt: str) -> Iterator[Row]:
    import pyarrow.parquet as pq  # heavy import: only when a Parquet list is read

    parquet = pq.ParquetFile(f)
    _check_columns(columns, parquet.schema_arrow.names, "Parquet schema")
    wanted = list(dict.fromkeys(columns))  # the URL column may be kept too
    for record_batch in parquet.iter_batches(batch_size=65536, columns=wanted):
        values = [record_batch.column(wanted.index(c)).to_pylist() for c in columns]
        for row in zip(*values, strict=True):
            yield _url(row[0]), row[1:]


def kept_kinds(settings: SourceSettings) -> tuple[tuple[str, str], ...]:
    """(name, kind) of each kept column: Parquet's own types; text in csv/tsv/jsonl lists
    (JSON's numbers are written as text: one line's type must not decide a column's)."""
    keep = settings.columns.keep
    if not keep or (settings.format or detect_format(settings.path)) != "parquet":
        return tuple((name, "string") for name in keep)
    import pyarrow.parquet as pq

    with fsspec.open(settings.path, "rb", **settings.storage_options) as f:
        schema = pq.ParquetFile(f).schema_arrow
    _check_columns(keep, schema.names, "Parquet schema")
    return tuple((name, arrow_kind(schema.field(name).type)) for name in keep)


def arrow_kind(kind: Any) -> str:
    """The manifest kind of an Arrow type: int64, float64, bool or string."""
    import pyarrow as pa

    if pa.types.is_integer(kind):
        return "int64"
    if pa.types.is_floating(kind):
        return "float64"
    return "bool" if pa.types.is_boolean(kind) else "string"


def dtype_kind(dtype: Any) -> str:
    """The manifest kind of a numpy/pandas dtype."""
    return {"i": "int64", "u": "int64", "f": "float64", "b": "bool"}.get(
        getattr(dtype, "kind", "O"), "string"
    )


class SeenSet:
    """An exact set of URLs, kept as 64-bit hashes, in bounded memory.

    The latest ``memory_keys`` hashes sit in numpy open-addressing tables (16 bytes per
    URL at their maximum load of 1/2); when those are full they move to a
    :class:`SpilledKeys` file in the temporary directory (~14 bytes per URL on disk) and
    the tables start again. Before, every hash stayed in memory: 16 MiB of the client's
    29 MiB of growth from 10k to 1M URLs (scale_bench), 16 GB for a billion. Two
    different URLs share a hash with probability ~n^2/2^65 (about 3e-4 for 10^8 URLs):
    the second would be reported as a duplicate.

    If the temporary directory cannot take the file, the set says so once (a warning)
    and keeps every hash in memory from then on: nothing is lost, only the bound.

    The hashes are split over SHARDS tables by their top bits, each growing on its own:
    doubling one table of all the URLs held the old and the new at once, 1.5x the table
    at each growth. A shard's growth adds 1/SHARDS.
    """

    SHARDS = 64
    GROW_SLICE = 1 << 16
    MEMORY_KEYS = 1 << 15  # 0.5-1 MiB of tables; a spill of 32,768 keys takes ~0.07 s

    def __init__(self, capacity: int = 1 << 15, memory_keys: int | None = None) -> None:
        per_shard = -(-capacity // self.SHARDS)
        self._initial = 1 << max(4, (per_shard * 2 - 1).bit_length())
        self._shard_shift = 64 - (self.SHARDS.bit_length() - 1)
        self._memory_keys = self.MEMORY_KEYS if memory_keys is None else memory_keys
        self._spilled: SpilledKeys | None = None
        self._spill_failed = False
        self._empty_tables()

    def __len__(self) -> int:
        return self._held + (len(self._spilled) if self._spilled else 0)

    @staticmethod
    def key(url: str) -> int:
        digest = hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little") or 1  # 0 marks an empty slot

    def add(self, url: str) -> bool:
        """Add a URL; True if it was new."""
        key = self.key(url)
        if self._held >= self._memory_keys and not self._spill_failed:
            self._spill()
        shard = key >> self._shard_shift  # the top bits; the slot comes from the low ones
        if (self._counts[shard] + 1) * 2 > len(self._tables[shard]):
            self._grow(shard)
        table = self._tables[shard]
        slot = _slot_of(table, key)
        if int(table[slot]) == key or (self._spilled is not None and key in self._spilled):
            return False
        table[slot] = key
        self._counts[shard] += 1
        self._held += 1
        return True

    def __contains__(self, url: str) -> bool:
        key = self.key(url)
        table = self._tables[key >> self._shard_shift]
        if int(table[_slot_of(table, key)]) == key:
            return True
        return self._spilled is not None and key in self._spilled

    def nbytes(self) -> int:
        """Bytes held in memory: the tables and the spilled keys' filter."""
        spilled = self._spilled.nbytes() if self._spilled else 0
        return sum(table.nbytes for table in self._tables) + spilled

    def close(self) -> None:
        """Remove the spilled keys' file now (it goes with the set otherwise)."""
        if self._spilled is not None:
            self._spilled.close()

    def _empty_tables(self) -> None:
        self._tables = [np.zeros(self._initial, dtype=np.uint64) for _ in range(self.SHARDS)]
        self._counts = [0] * self.SHARDS
        self._held = 0  # sum(self._counts)

    def _spill(self) -> None:
        """Move the tables' keys to the file and start them again."""
        keys = np.concatenate([table[table != 0] for table in self._tables])
        try:
            if self._spilled is None:
                self._spilled = SpilledKeys()
            self._spilled.add(keys)
        except (OSError, sqlite3.Error) as exc:
            self._spill_failed = True
            log.warning(
                "cannot keep seen URLs in %s (%s): keeping them all in memory, 16 bytes "
                "per URL; set TMPDIR to a writable directory with room",
                tempfile.gettempdir(),
                exc,
            )
            return
        self._empty_tables()

    def _grow(self, shard: int) -> None:
        old = self._tables[shard]
        table = self._tables[shard] = np.zeros(len(old) * 2, dtype=np.uint64)
        # A slice at a time: ``tolist()`` of a whole table made a Python int per slot
        # (~36 MB at 1M URLs when there was one table).
        for start in range(0, len(old), self.GROW_SLICE):
            chunk = old[start : start + self.GROW_SLICE]
            for key in chunk[chunk != 0].tolist():
                _insert(table, key)


class SpilledKeys:
    """64-bit keys in an SQLite table in a temporary file, behind a Bloom filter.

    The file is unlinked as soon as it is made (POSIX), so a killed process leaves
    nothing behind; elsewhere it is removed when the set closes or is collected. SQLite
    keeps at most CACHE_KIB of its pages in memory, whatever the number of keys.

    Measured (1M random keys, one core): a lookup in SQLite costs ~4.3 us, the filter
    0.6 us, so a new URL asks SQLite only when the filter cannot rule it out; adding
    sorted keys costs ~2 us each.
    """

    FILTER_SHIFTS = (0, 21, 39)  # a key's three filter bits: its bits from 0, 21 and 39 on
    FILTER_BITS = 1 << 24  # 2 MiB: 1 in 220 new keys asks SQLite at 1M keys, 3 in 5 at 10M
    CACHE_KIB = 1024
    INSERT_SLICE = 4096  # keys made Python ints at a time

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="imgtasks-seen-", suffix=".sqlite")
        os.close(fd)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._finalizer = weakref.finalize(self, _close_and_remove, self._db, path)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "locking_mode=EXCLUSIVE"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute(f"PRAGMA cache_size=-{self.CACHE_KIB}")
        self._db.execute("CREATE TABLE seen (k INTEGER PRIMARY KEY)")
        with contextlib.suppress(OSError):  # not on Windows: removed on close instead
            os.unlink(path)
        self._filter = bytearray(self.FILTER_BITS // 8)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: int) -> bool:
        bits, mask = self._filter, self.FILTER_BITS - 1
        for shift in self.FILTER_SHIFTS:
            position = (key >> shift) & mask
            if not bits[position >> 3] >> (position & 7) & 1:
                return False
        row = self._db.execute("SELECT 1 FROM seen WHERE k = ?", (_signed(key),)).fetchone()
        return row is not None

    def add(self, keys: np.ndarray) -> None:
        """Add new keys (uint64, none already here); all or none of them on error."""
        signed = np.sort(keys.view(np.int64))  # sorted: each B-tree page is written once
        self._db.execute("BEGIN")
        try:
            for start in range(0, len(signed), self.INSERT_SLICE):
                chunk = signed[start : start + self.INSERT_SLICE].tolist()
                self._db.executemany("INSERT INTO seen VALUES (?)", ((k,) for k in chunk))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        bits, mask = np.frombuffer(self._filter, dtype=np.uint8), self.FILTER_BITS - 1
        for shift in self.FILTER_SHIFTS:
            positions = (keys >> np.uint64(shift)) & np.uint64(mask)
            values = (np.uint64(1) << (positions & np.uint64(7))).astype(np.uint8)
            np.bitwise_or.at(bits, positions >> np.uint64(3), values)
        self._count += len(keys)

    def nbytes(self) -> int:
        return len(self._filter) + self.CACHE_KIB * 1024

    def close(self) -> None:
        self._finalizer()


def _signed(key: int) -> int:
    return key - (1 << 64) if key >= 1 << 63 else key


def _close_and_remove(db: sqlite3.Connection, path: str) -> None:
    db.close()
    with contextlib.suppress(OSError):
        os.unlink(path)


def _slot_of(table: np.ndarray, key: int) -> int:
    """Where ``key`` is in an open-addressing table (linear probing), or the empty slot
    where it would go."""
    mask = len(table) - 1
    slot = key & mask
    while (here := int(table[slot])) != key and here != 0:
        slot = (slot + 1) & mask
    return slot


def _insert(table: np.ndarray, key: int) -> bool:
    """Put ``key`` in an open-addressing table; False if it was there."""
    slot = _slot_of(table, key)
    if int(table[slot]) == key:
        return False
    table[slot] = key
    return True


def classify(
    urls: Iterable[str] | Iterable[tuple[str, Carried]],
    max_url_length: int = DEFAULT_MAX_URL_LENGTH,
) -> Iterator[UrlEntry]:
    """Number the URLs (plain, or with what their row carries) and mark the invalid ones
    and the repeats."""
    seen = SeenSet()
    try:
        for index, item in enumerate(urls):
            url, carried = (item, NOTHING) if isinstance(item, str) else item
            problem = validate_url(url, max_url_length)
            if problem is not None:
                yield UrlEntry(index, url, INVALID_URL, problem, carried)
            elif not seen.add(url):
                yield UrlEntry(index, url, DUPLICATE, "URL seen earlier in this run", carried)
            else:
                yield UrlEntry(index, url, carried=carried)
    finally:
        seen.close()


def batched(
    entries: Iterable[UrlEntry], batch_size: int | Callable[[], int], shard_size: int = 0
) -> Iterator[UrlBatch]:
    """Group entries into batches of ``batch_size`` URLs to fetch: a number, or a callable
    asked as each batch starts (``window.BatchSizing``: sizes chosen by measurement).

    Invalid and duplicate entries ride along with the batch they fall in (they cost no
    work), so every batch carries up to ``batch_size`` real downloads. With a
    ``shard_size``, no batch spans two shards (input lines ``s * shard_size`` onwards):
    a shard is written once its own batches are done.
    """
    size_now = batch_size if callable(batch_size) else lambda: batch_size
    chunk: list[UrlEntry] = []
    pending = 0
    batch_id = 0
    size = 0
    for entry in entries:
        if chunk and shard_size and entry.index // shard_size != chunk[0].index // shard_size:
            yield UrlBatch(batch_id, tuple(chunk))
            batch_id += 1
            chunk, pending = [], 0
        if not chunk:
            size = size_now()
        chunk.append(entry)
        pending += entry.pending
        if pending >= size or len(chunk) >= 8 * size:
            yield UrlBatch(batch_id, tuple(chunk))
            batch_id += 1
            chunk, pending = [], 0
    if chunk:
        yield UrlBatch(batch_id, tuple(chunk))


def url_batches(
    settings: SourceSettings, shard_size: int = 0, sizing: Callable[[], int] | None = None
) -> Iterator[UrlBatch]:
    """The whole source stage: read, classify, batch; lazily. ``sizing``: batch sizes
    chosen as the run goes (else ``settings.batch_size``)."""
    carry = settings.columns.carry
    rows = ((url, carry(values)) for url, values in read_rows(settings))
    size = sizing or settings.batch_size
    return batched(classify(rows, settings.max_url_length), size, shard_size)
