"""The client's cost of the input path: the client reading the URL list, against the
workers reading it (``read_on="workers"``), side by side.

    python benchmarks/input_bench.py                      # 1,000,000 URLs, Parquet
    python benchmarks/input_bench.py --count 200000 --format csv --repeat 3

Client reads: ``sources.url_batches`` (read, validate, de-duplicate, batch) in this
process. Workers read: ``WorkerInput.start`` on a LocalCluster of worker processes, then
every batch handle drawn from it (the plan node, one read node and one size per
partition, a ``PartBatch`` per batch). Both stop where the batch graphs would be
submitted (that per-batch cost is the same in both modes). CPU seconds: the calling
thread's (``time.thread_time``: the input path itself), and the whole process's
(``time.process_time``: also the client's event loop and the LocalCluster's scheduler,
~0.04 CPU-s per second idle here). Runs alternate, so both modes see the same load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from distributed import Client, LocalCluster

from imgtasks.download import DownloadSettings
from imgtasks.flow import Wiring
from imgtasks.nodes import JobSettings
from imgtasks.sinks import OutputSettings
from imgtasks.sources import SourceSettings, url_batches
from imgtasks.thumbnail import ThumbSettings
from imgtasks.worker_input import WorkerInput

ROW_GROUP = 50_000


@dataclass(frozen=True)
class Figures:
    urls: int
    batches: int
    cpu_s: float  # this process: the client, its Dask threads, the LocalCluster's scheduler
    thread_s: float  # the calling thread's: the input path itself
    wall_s: float

    @property
    def urls_per_cpu_s(self) -> float:
        return self.urls / max(self.thread_s, 1e-9)


def write_list(folder: Path, count: int, fmt: str) -> Path:
    urls = pa.array([f"http://127.0.0.1:9/img/{i}.jpg" for i in range(count)])
    table = pa.table({"url": urls})
    path = folder / f"urls.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=ROW_GROUP)
    else:
        pacsv.write_csv(table, path, pacsv.WriteOptions(quoting_style="none"))
    return path


def client_reads(path: Path, batch_size: int) -> Figures:
    cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
    urls = batches = 0
    for batch in url_batches(SourceSettings(str(path), batch_size=batch_size)):
        urls += len(batch.entries)
        batches += 1
    return Figures(urls, batches, *_since(cpu, thread, wall))


def workers_read(path: Path, batch_size: int, client: Client, out: Path, count: int) -> Figures:
    job = JobSettings(ThumbSettings(), OutputSettings(str(out)), run_id="bench")
    cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
    source = WorkerInput(listing=SourceSettings(str(path), batch_size=batch_size))
    _, handles = source.start(client, Wiring(DownloadSettings(), job))
    batches = sum(1 for _ in handles)
    # The client never sees the lines: the count is the list's, which the batches cover.
    return Figures(count, batches, *_since(cpu, thread, wall))


def _since(cpu: float, thread: float, wall: float) -> tuple[float, float, float]:
    now = time.process_time(), time.thread_time(), time.perf_counter()
    return now[0] - cpu, now[1] - thread, now[2] - wall


def row(name: str, f: Figures) -> str:
    return (
        f"{name:<10}{f.urls:>10,}{f.batches:>9,}{f.cpu_s:>13.2f}{f.thread_s:>13.2f}"
        f"{f.wall_s:>8.2f}{f.urls_per_cpu_s:>20,.0f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1_000_000)
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        path = write_list(Path(tmp), args.count, args.format)
        print(f"{args.count:,} URLs, {args.format}, batch size {args.batch_size}, "
              f"{args.workers} worker processes")  # fmt: skip
        print(f"{'who reads':<10}{'URLs':>10}{'batches':>9}{'process CPU s':>14}"
              f"{'thread CPU s':>13}{'wall s':>8}{'URLs/thread CPU s':>20}")  # fmt: skip
        for _ in range(args.repeat):
            on_client = client_reads(path, args.batch_size)
            on_workers = workers_read(path, args.batch_size, client, Path(tmp), args.count)
            print(row("client", on_client))
            print(row("workers", on_workers))
            ratio = on_workers.urls_per_cpu_s / on_client.urls_per_cpu_s
            print(f"  workers / client: {ratio:.1f}x the URLs per CPU second of the input thread")


if __name__ == "__main__":
    main()
