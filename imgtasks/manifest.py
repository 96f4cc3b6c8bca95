"""The manifest: one Parquet part per batch, one row per input entry.

Layout under the output root::

    manifest/part-<run>-<batch>.parquet

Parts are named by run (UTC to the microsecond), so the latest row of a URL is the one in
the last part that has it. Naming, writing, reading and the resume state (which URLs an
earlier run finished) all live here. Every value is fitted to ``MANIFEST_SCHEMA`` before it
is written, so no header a file claims can make a part unwritable.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imgtasks.sinks import OutputSettings, existing, filesystem, write_file
from imgtasks.status import Status

MANIFEST_DIR = "manifest"


@dataclass(frozen=True)
class Record:
    """One manifest row: what happened to one input entry."""

    index: int
    url: str
    status: str
    error: str = ""
    path: str = ""  # thumbnail path relative to the output root
    width: int = 0
    height: int = 0
    orig_width: int = 0
    orig_height: int = 0
    bytes: int = 0  # size of the downloaded body
    sha256: str = ""  # of the downloaded body
    http_status: int = 0
    source_format: str = ""
    download_s: float = 0.0  # requests and bodies; waits for a per-host slot excluded
    thumbnail_s: float = 0.0
    original_path: str = ""  # kept original, relative to its root, when originals are kept
    caption: str = ""  # the input's caption column, when one is named
    phash: str = ""  # the thumbnail's 64-bit difference hash, 16 hex digits
    encoding: str = ""  # "reencoded", or "original": the image's own bytes kept as they were
    # The input's kept columns as (name, value) pairs: columns of their own in the part,
    # after the fixed ones, typed by the run's KeptColumns.
    kept: tuple[tuple[str, Any], ...] = field(default=(), compare=False)


MANIFEST_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("url", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        # int64: file headers claim sizes up to 2**32 - 1 (BMP, TIFF), past int32
        ("orig_width", pa.int64()),
        ("orig_height", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("http_status", pa.int32()),
        ("source_format", pa.string()),
        ("download_s", pa.float64()),
        ("thumbnail_s", pa.float64()),
        ("original_path", pa.string()),
        ("caption", pa.string()),
        ("phash", pa.string()),
        ("encoding", pa.string()),
    ]
)
assert [f.name for f in fields(Record)] == [*MANIFEST_SCHEMA.names, "kept"]

# The types a kept input column may have in the manifest; anything else is kept as text.
KINDS = {"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(), "string": pa.string()}
KeptColumns = tuple[tuple[str, str], ...]  # (name, kind) of each kept input column


def kept_schema(kept: KeptColumns) -> pa.Schema:
    """The manifest's schema with the kept input columns appended."""
    clash = [name for name, _ in kept if name in MANIFEST_SCHEMA.names or name == "kept"]
    if clash:
        raise ValueError(f"kept columns {clash} share a manifest column's name; rename them")
    return pa.schema([*MANIFEST_SCHEMA, *((name, KINDS[kind]) for name, kind in kept)])


def manifest_relpath(run_id: str, batch_id: int) -> str:
    return f"{MANIFEST_DIR}/part-{run_id}-{batch_id:08d}.parquet"


MAX_TEXT = 4096  # characters kept of a string column; errors quoting hostile data stay small
_INT_RANGES = {
    pa.int32(): (-(2**31), 2**31 - 1),
    pa.int64(): (-(2**63), 2**63 - 1),
}


def records_table(records: Iterable[Record], kept: KeptColumns = ()) -> pa.Table:
    """The rows as a table of the manifest's schema (with the kept input columns appended),
    whatever values a file put in them."""
    schema = kept_schema(kept)
    return pa.Table.from_pylist([manifest_row(r, kept) for r in records], schema=schema)


def manifest_row(record: Record, kept: KeptColumns = ()) -> dict[str, Any]:
    """A record's fields made to fit the schema: integers clamped to their column's range,
    floats made floats, strings valid UTF-8 (lone surrogates escaped) and at most
    ``MAX_TEXT`` characters. URLs are kept whole: resume matches rows by URL. Kept input
    columns are fitted alike, a missing value staying null."""
    row = {c.name: _fit(getattr(record, c.name), c.type, c.name == "url") for c in MANIFEST_SCHEMA}
    values = dict(record.kept)
    for name, kind in kept:
        value = values.get(name)
        row[name] = None if _missing(value) else _fit(value, KINDS[kind], False)
    return row


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(value != value)  # None, NaN, NaT
    except (TypeError, ValueError):  # arrays and the like compare element-wise
        return False


def _fit(value: Any, kind: pa.DataType, whole: bool) -> Any:
    if pa.types.is_boolean(kind):
        return value if isinstance(value, bool) else bool(_as_int(value))
    if pa.types.is_integer(kind):
        low, high = _INT_RANGES[kind]
        return min(max(_as_int(value), low), high)
    if pa.types.is_floating(kind):
        return _as_float(value)
    text = value if isinstance(value, str) else "" if value is None else _as_text(value)
    text = text if whole else text[:MAX_TEXT]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _as_text(value: Any) -> str:
    if isinstance(value, dict | list):  # a JSON list's nested value: kept as JSON
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # None, NaN, inf, text
        return 0


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0


def write_manifest_part(
    settings: OutputSettings,
    run_id: str,
    batch_id: int,
    records: Iterable[Record],
    kept: KeptColumns = (),
) -> str:
    """Write one batch's rows as a Parquet file; returns its path relative to the root."""
    buffer = io.BytesIO()
    pq.write_table(records_table(records, kept), buffer, compression="zstd")
    relpath = manifest_relpath(run_id, batch_id)
    write_file(settings, relpath, buffer.getvalue())
    return relpath


def manifest_parts(settings: OutputSettings) -> list[str]:
    """Paths (relative to the root) of every manifest part, in name order."""
    fs, root = filesystem(settings)
    base = f"{root}/{MANIFEST_DIR}"
    if not fs.exists(base):
        return []
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
    return [
        f"{MANIFEST_DIR}/{n}" for n in names if n.startswith("part-") and n.endswith(".parquet")
    ]


def keep_only_run(settings: OutputSettings, run_id: str) -> None:
    """After a complete run, drop earlier runs' parts: one current row per URL remains."""
    fs, root = filesystem(settings)
    for part in manifest_parts(settings):
        if not part.startswith(f"{MANIFEST_DIR}/part-{run_id}-"):
            fs.rm(f"{root}/{part}")


def read_part(settings: OutputSettings, relpath: str, columns: list[str] | None = None) -> pa.Table:
    """One manifest part. ``pq.ParquetFile``, not ``pq.read_table``: the latter imports
    ``pyarrow.dataset`` on first use, ~0.5 s of the client's time at the end of a run."""
    fs, root = filesystem(settings)
    with fs.open(f"{root}/{relpath}", "rb") as f:
        return pq.ParquetFile(f).read(columns=columns)


def read_manifest(settings: OutputSettings, parts: Iterable[str] | None = None) -> pa.Table:
    """All manifest rows (of the given parts, or of every part)."""
    tables = []
    for relpath in manifest_parts(settings) if parts is None else parts:
        tables.append(conformed(read_part(settings, relpath)))
    if not tables:
        return MANIFEST_SCHEMA.empty_table()
    # Runs may keep different input columns: a part without one has nulls there.
    return pa.concat_tables(tables, promote_options="permissive")


def conformed(table: pa.Table) -> pa.Table:
    """A part as ``MANIFEST_SCHEMA`` then its kept columns; a column an older version did
    not write (``caption``) filled with its empty value."""
    fixed = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.array([_fit(None, f.type, False)] * table.num_rows, f.type)
        for f in MANIFEST_SCHEMA
    ]
    extra = [name for name in table.column_names if name not in MANIFEST_SCHEMA.names]
    columns = fixed + [table.column(name) for name in extra]
    return pa.table(columns, names=[*MANIFEST_SCHEMA.names, *extra])


def record_of(row: dict[str, Any]) -> Record:
    """A manifest row read back as a Record (its kept columns as ``kept``)."""
    fixed = {name: row[name] for name in MANIFEST_SCHEMA.names}
    kept = tuple((k, v) for k, v in row.items() if k not in fixed)
    return Record(**fixed, kept=kept)


def current_rows(settings: OutputSettings) -> dict[str, Record]:
    """The latest manifest row of every URL (parts are named by run, oldest first)."""
    latest: dict[str, Record] = {}
    for part in manifest_parts(settings):
        for row in read_manifest(settings, [part]).to_pylist():
            latest[row["url"]] = record_of(row)
    return latest


def finished_rows(settings: OutputSettings) -> dict[str, Record]:
    """URLs whose latest row is ``ok`` and whose thumbnail still exists: nothing to redo."""
    ok = {url: r for url, r in current_rows(settings).items() if r.status == Status.OK and r.path}
    present = existing(settings, [r.path for r in ok.values()])
    return {url: r for url, r in ok.items() if r.path in present}
