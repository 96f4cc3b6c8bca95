"""Benchmark: the manifest of a big run, a part per batch vs compacted parts.

    python benchmarks/manifest_bench.py                        # 100k and 1M rows
    python benchmarks/manifest_bench.py --counts 100000 --part-rows 20000

(after ``pip install -e .``). For each row count it writes the parts a run writes: one
per batch of ``--batch-size`` realistic rows (an ok row's fields filled as the thumbnail
node fills them), through ``imgtasks.manifest.write_manifest_part``. Then it compacts them
as the flow does (``Rollup`` told of the batches in a shuffled order, ``compact_parts`` on
each span it hands out; here in this process, one after another). Before and after, it
counts the manifest's files and bytes and times three readers: ``pandas.read_parquet`` of
the directory (the README's way), ``imgtasks.manifest.read_manifest`` (what
``Result.manifest()`` reads) and ``current_rows`` (what ``--resume`` reads). Times are
wall and CPU seconds of this process, the page cache warm both times.

The goal (issue 16): a 1M-row manifest in at most ~100 files, read in <= 5 s.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scale_bench import int_list

from imgtasks.manifest import (
    MANIFEST_DIR,
    Record,
    Rollup,
    compact_parts,
    current_rows,
    read_manifest,
    write_manifest_part,
)
from imgtasks.sinks import OutputSettings, output_relpath

RUN = "20261130T120000.000000Z-bench0"
GOAL_FILES = 100
GOAL_READ_S = 5.0


def records(first: int, count: int) -> Iterator[Record]:
    """Rows as the thumbnail node writes them for ok images (most rows of a real run)."""
    for i in range(first, first + count):
        url = f"https://img{i % 997}.example.org/photos/2026/{i:09d}/original.jpg"
        digest = hashlib.sha256(url.encode()).hexdigest()
        yield Record(
            index=i,
            url=url,
            status="ok",
            path=output_relpath(url, "jpg"),
            width=128,
            height=96,
            orig_width=1024 + i % 512,
            orig_height=768,
            bytes=150_000 + i % 90_000,
            sha256=digest,
            http_status=200,
            source_format="JPEG",
            download_s=0.05 + (i % 100) / 1000,
            thumbnail_s=0.01 + (i % 50) / 1000,
            phash=digest[:16],
            encoding="reencoded",
        )


@dataclass
class Timing:
    wall_s: float
    cpu_s: float


def timed(work: Callable[[], object]) -> tuple[object, Timing]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = work()
    return value, Timing(time.perf_counter() - wall, time.process_time() - cpu)


@dataclass
class Layout:
    """The manifest as it lies: files, bytes, and how long each reader takes (None: not
    timed)."""

    files: int
    bytes: int
    pandas: Timing | None = None
    library: Timing | None = None
    resume: Timing | None = None


def measure(settings: OutputSettings, rows: int, read: bool = True) -> Layout:
    directory = Path(settings.root) / MANIFEST_DIR
    names = list(directory.glob("part-*.parquet"))
    layout = Layout(len(names), sum(p.stat().st_size for p in names))
    if not read:
        return layout
    frame, layout.pandas = timed(lambda: pd.read_parquet(directory))
    table, layout.library = timed(lambda: read_manifest(settings))
    latest, layout.resume = timed(lambda: current_rows(settings))
    got = (len(frame), table.num_rows, len(latest))  # type: ignore[arg-type, attr-defined]
    if got != (rows, rows, rows):
        raise SystemExit(f"{rows} rows written, the readers saw {got}")
    return layout


def write_batches(settings: OutputSettings, rows: int, batch_size: int) -> int:
    batches = (rows + batch_size - 1) // batch_size
    for batch_id in range(batches):
        first = batch_id * batch_size
        write_manifest_part(settings, RUN, batch_id, records(first, min(batch_size, rows - first)))
    return batches


def compact(settings: OutputSettings, batches: int, rows: int, batch_size: int) -> int:
    """The flow's path: batches reported out of order, spans compacted as they are ready."""
    rollup = Rollup(settings.manifest_part_rows)
    order = random.Random(0).sample(range(batches), batches)
    spans = 0
    for batch_id in order:
        entries = min(batch_size, rows - batch_id * batch_size)
        for span in rollup.add(batch_id, entries):
            compact_parts(settings, RUN, *span)
            spans += 1
    for span in rollup.finish():
        compact_parts(settings, RUN, *span)
        spans += 1
    return spans


def one_count(rows: int, batch_size: int, part_rows: int, workdir: Path, before_up_to: int) -> None:
    out = workdir / f"manifest-{rows}"
    settings = OutputSettings(str(out), manifest_part_rows=part_rows)
    batches, write_t = timed(lambda: write_batches(settings, rows, batch_size))
    print(f"[{rows} rows: {batches} batch parts written in {write_t.wall_s:.1f} s]", flush=True)
    before = measure(settings, rows, read=rows <= before_up_to)
    spans, compact_t = timed(lambda: compact(settings, int(batches), rows, batch_size))  # type: ignore[arg-type]
    after = measure(settings, rows)
    shutil.rmtree(out, ignore_errors=True)
    print_table(rows, batch_size, part_rows, before, after)
    print(
        f"  compaction: {spans} parts, {compact_t.cpu_s:.1f} CPU s "
        f"({1e6 * compact_t.cpu_s / rows:.1f} us per row; on the workers in a run), "
        f"wall {compact_t.wall_s:.1f} s"
    )
    assert after.pandas is not None and after.library is not None
    verdict = after.files <= GOAL_FILES * max(1, rows // 1_000_000) and (
        max(after.pandas.wall_s, after.library.wall_s) <= GOAL_READ_S * max(1, rows / 1e6)
    )
    print(
        f"  goal (<= ~{GOAL_FILES} files per 1M rows, read <= {GOAL_READ_S:.0f} s per 1M): "
        + ("met" if verdict else "NOT MET")
    )


def print_table(rows: int, batch: int, part_rows: int, before: Layout, after: Layout) -> None:
    print(f"\n{rows:,} rows; a part per batch of {batch} vs parts of >= {part_rows:,} rows")
    print(f"{'':<28}{'per batch':>14}{'compacted':>14}{'ratio':>9}")
    pairs = [
        ("files", before.files, after.files, "{:,}"),
        ("MB", before.bytes / 1e6, after.bytes / 1e6, "{:.1f}"),
        ("bytes per row", before.bytes / rows, after.bytes / rows, "{:.0f}"),
    ]
    for name, a, b in [
        ("pandas.read_parquet", before.pandas, after.pandas),
        ("read_manifest", before.library, after.library),
        ("current_rows (resume)", before.resume, after.resume),
    ]:
        pairs.append((f"{name} wall s", a and a.wall_s, b and b.wall_s, "{:.2f}"))
        pairs.append(("  CPU s", a and a.cpu_s, b and b.cpu_s, "{:.2f}"))
    for name, x, y, fmt in pairs:
        ratio = f"x{y / x:.3f}" if x and y is not None else "-"
        cells = [fmt.format(v) if v is not None else "not timed" for v in (x, y)]
        print(f"{name:<28}{cells[0]:>14}{cells[1]:>14}{ratio:>9}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Files, bytes and read time of the manifest: per batch vs compacted.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--counts", type=int_list, default=[100_000, 1_000_000], help="rows")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch part")
    parser.add_argument(
        "--part-rows",
        type=int,
        default=OutputSettings().manifest_part_rows,
        help="rows per compacted part (OutputSettings.manifest_part_rows)",
    )
    parser.add_argument(
        "--before-up-to",
        type=int,
        default=100_000,
        help="time the readers of the per-batch layout only up to this many rows (at 1M "
        "they take minutes; its files and bytes are counted all the same)",
    )
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="manifest-bench-") as tmp:
        for rows in args.counts:
            one_count(rows, args.batch_size, args.part_rows, Path(tmp), args.before_up_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
