"""Benchmark: what the I/O worker's memory is made of, round after round on one cluster.

    python benchmarks/io_memory.py                                 # 4 rounds of 30,000 tiny URLs
    python benchmarks/io_memory.py --rounds 6 --per-round 40000 --insecure
    python benchmarks/io_memory.py --env MALLOC_MMAP_THRESHOLD_=65536   # a worker variable
    python benchmarks/io_memory.py --tracemalloc 5                 # + Python's growth, by line
    python benchmarks/io_memory.py --batch-size 16                 # 8x the tasks per URL

(after ``pip install -e .``). ``scale_bench.py`` says *whether* a process's peak grows from
10k to 1M URLs; this says *what* grows in the I/O worker, where the 1M runs left ~20 MiB
of creep unexplained (issue 16). One hybrid cluster (TLS unless ``--insecure``) runs
``imgtasks.thumbnails(urls, client=...)`` once per round on ``--per-round`` distinct tiny
URLs (0 ms; the demo server a process of its own), and after each round asks the I/O
worker (``client.run``) for:

- its resident memory by mapping kind (``/proc/self/smaps``): the main heap, thread
  stacks, other anonymous mappings (pymalloc's 1 MiB arenas and bigger ones apart), files;
- glibc's view of the heap (``mallinfo2``): bytes in use, free but held, mmapped chunks;
- Python's: allocated blocks (``sys.getallocatedblocks``), threads;
- with ``--tracemalloc FRAMES``: tracing starts with round 1; the ``--tracemalloc-top``
  largest growths by line between the snapshot after round 2 and the one after the last.
  Tracing costs malloc too (its own tables) and slows the worker.

Native growth is ``in_use`` minus what tracemalloc accounts for. Rounds are separate runs,
so each round's compaction and end are inside it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import requests

import imgtasks
from imgtasks import cluster as clusters
from imgtasks.demo import server_process
from imgtasks.worker_input import Readers

MIB = 2**20
MALLINFO2_FIELDS = (
    *("arena", "ordblks", "smblks", "hblks", "hblkhd"),
    *("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"),
)
STACK_SIZES = {8 << 20, (8 << 20) + 4096, (8 << 20) - 4096}  # a thread's stack (+- guard)


def worker_memory() -> dict[str, Any]:
    """Run in the worker: its memory by kind, in MiB (counts where named)."""

    # made here: this module travels to the worker by value, and ctypes types do not pickle
    fields = [(name, ctypes.c_size_t) for name in MALLINFO2_FIELDS]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = type("MallInfo2", (ctypes.Structure,), {"_fields_": fields})
    info = libc.mallinfo2()
    resident = smaps_by_kind()
    return {
        "rss": round(sum(resident.values()), 1),
        **resident,
        "malloc_in_use": round(info.uordblks / MIB, 2),
        "malloc_free": round(info.fordblks / MIB, 2),
        "malloc_mmapped": round(info.hblkhd / MIB, 2),
        "py_blocks": sys.getallocatedblocks(),
        "threads": threading.active_count(),
        "cpu_s": round(time.process_time(), 2),  # the worker's, since it started
    }


def smaps_by_kind() -> dict[str, float]:
    """Resident MiB of this process's mappings, by kind."""
    kinds = dict.fromkeys(("heap", "stacks", "anon_1mib", "anon_big", "anon_small", "files"), 0.0)
    kind = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields[0].endswith(":"):
                if fields[0] == "Rss:" and kind is not None:
                    kinds[kind] += int(fields[1]) / 1024
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            kind = mapping_kind(hi - lo, fields[5] if len(fields) > 5 else "")
    return {k: round(v, 1) for k, v in kinds.items()}


def mapping_kind(size: int, name: str) -> str:
    if name == "[heap]":
        return "heap"
    if name.startswith("[stack") or size in STACK_SIZES:
        return "stacks"
    if name:
        return "files"  # files and the kernel's [vdso] and such
    if size <= 256 * 1024:
        return "anon_small"
    return "anon_1mib" if size <= 1024 * 1024 + 4096 else "anon_big"


def start_tracing(frames: int) -> None:
    import tracemalloc

    tracemalloc.start(frames)


def take_snapshot(path: str) -> None:
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.take_snapshot().dump(path)


def traced_growth(before: str, after: str, top: int) -> list[str]:
    import tracemalloc

    old, new = tracemalloc.Snapshot.load(before), tracemalloc.Snapshot.load(after)
    total = sum(s.size for s in new.statistics("filename")) - sum(
        s.size for s in old.statistics("filename")
    )
    lines = [f"traced by tracemalloc: {total / MIB:+.2f} MiB"]
    for stat in new.compare_to(old, "lineno")[:top]:
        lines.append(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d}  {stat.traceback}")
    return lines


def round_urls(tiny: list[str], round_no: int, count: int) -> list[str]:
    """``count`` URLs no earlier round fetched (the tiny images, with a query that differs)."""
    return [f"{tiny[i % len(tiny)]}?round={round_no}&i={i}" for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.env)
    settings = clusters.ClusterSettings(
        insecure=args.insecure,
        worker_environ={**clusters.WORKER_PRE_SPAWN_ENVIRON, **extra},
        dashboard_address="127.0.0.1:0",
    )
    with (
        server_process(0.0, 0.0) as (base_url, _pid),
        tempfile.TemporaryDirectory(prefix="io-memory-") as scratch,
        clusters.run_config(),
    ):
        tiny = requests.get(f"{base_url}/urls?count=2000&kind=tiny", timeout=60).text.split()
        client, cluster = clusters.connect(settings)  # every worker joined
        with contextlib.ExitStack() as stack:
            stack.callback(client.close)
            if cluster is not None:
                stack.callback(cluster.close)
            io = Readers(client, route=True).addresses()[0]  # the download worker
            print(f"I/O worker {io}; worker variables {extra or 'as the flow sets them'}")
            run_rounds(client, io, tiny, args, scratch)
    return 0


def run_rounds(
    client: Any, io: str, tiny: list[str], args: argparse.Namespace, scratch: str
) -> None:
    snapshots: list[str] = []
    for round_no in range(args.rounds):
        if args.tracemalloc and round_no == 1:
            client.run(start_tracing, args.tracemalloc, workers=[io])
        out = os.path.join(scratch, f"out{round_no}")
        start = time.perf_counter()
        result = imgtasks.thumbnails(
            round_urls(tiny, round_no, args.per_round),
            out,
            client=client,
            batch_size=args.batch_size,
            progress=False,
            job_page=False,
        )
        took = time.perf_counter() - start
        memory = client.run(worker_memory, workers=[io])[io]
        print(f"round {round_no}: {result.ok} ok in {took:.0f} s  {json.dumps(memory)}", flush=True)
        if args.tracemalloc and round_no in (2, args.rounds - 1):  # rounds >= 4
            snapshots.append(os.path.join(scratch, f"snapshot{round_no}"))
            client.run(take_snapshot, snapshots[-1], workers=[io])
        shutil.rmtree(out, ignore_errors=True)
    if len(snapshots) == 2:
        print("\n".join(traced_growth(*snapshots, args.tracemalloc_top)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=30_000, help="URLs per round")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="URLs per batch (default: the flow's auto)"
    )
    parser.add_argument("--insecure", action="store_true", help="plain TCP instead of TLS")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a worker variable"
    )
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES")
    parser.add_argument("--tracemalloc-top", type=int, default=15)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.per_round < 1:
        parser.error("--rounds and --per-round must be >= 1")
    if args.tracemalloc and args.rounds < 4:
        parser.error("--tracemalloc needs --rounds >= 4 (tracing from round 1, compared 2 -> last)")
    if any("=" not in kv for kv in args.env):
        parser.error("--env takes NAME=VALUE")
    return args


if __name__ == "__main__":
    sys.exit(main())
