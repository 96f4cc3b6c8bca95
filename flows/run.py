"""The main job: download image URLs and make thumbnails on a Dask cluster.

    python flows/run.py                          # 1000 images from the embedded demo server
    python flows/run.py --scheduler processes    # single-threaded worker processes
    python flows/run.py --urls urls.parquet --out s3://bucket/thumbs --scheduler tcp://host:8786

For each batch of URLs the flow builds one download node feeding one thumbnail node
(``dask.delayed`` on the plain functions of ``imgtasks.nodes``), routes them to the I/O
and CPU worker pools by resources, and submits batches through a bounded window so
memory stays flat however long the list is.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dask
from dask.delayed import Delayed
from distributed import Client, as_completed, performance_report
from imgtasks.demo_server import DemoServer, ServerSettings

from imgtasks import cluster as clusters
from imgtasks.download import DownloadSettings
from imgtasks.nodes import BatchReport, JobSettings, download_batch, thumbnail_batch
from imgtasks.sinks import OutputSettings, manifest_parts
from imgtasks.sources import SourceSettings, UrlBatch, batched, classify, url_batches
from imgtasks.thumbnail import ThumbSettings, parse_size

log = logging.getLogger("imgtasks.flow")

DEFAULT_COUNT = 1000
DEFAULT_BATCH_SIZE = 16
DEFAULT_OUT = "thumbnails"


class ArgumentError(Exception):
    """A bad command-line argument: one line on stderr and exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="run.py",
        description="Download image URLs concurrently and save a thumbnail of each, with a "
        "per-URL manifest, on a local hybrid Dask cluster or a remote one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("source (default: the embedded demo image server)")
    src.add_argument(
        "--urls",
        metavar="PATH",
        help="URL list: .txt/.csv/.tsv/.parquet/.jsonl, optionally .gz; local or fsspec URL",
    )
    src.add_argument(
        "--url-column",
        default="url",
        help="column/key holding the URL in csv/tsv/parquet/jsonl lists",
    )
    src.add_argument("--count", type=int, default=DEFAULT_COUNT, help="demo: number of images")
    src.add_argument(
        "--latency", type=float, default=0.1, help="demo: injected latency per request, seconds"
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR|URL",
        help="where thumbnails and the manifest go (local dir or fsspec URL)",
    )
    out.add_argument("--size", default="128x128", metavar="WxH", help="thumbnail box")
    out.add_argument(
        "--mode",
        default="fit",
        choices=("fit", "crop", "pad"),
        help="fit inside the box, crop to it, or pad to it",
    )
    out.add_argument(
        "--format", default="jpeg", choices=("jpeg", "png", "webp"), help="thumbnail format"
    )
    out.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality 1-100")
    out.add_argument(
        "--keep-originals", metavar="DIR|URL", help="also keep the downloaded files there"
    )

    run = p.add_argument_group("execution")
    run.add_argument(
        "--scheduler",
        default="hybrid",
        metavar="KIND|ADDRESS",
        help="hybrid, processes, threads, sync, or a scheduler address like tcp://host:8786",
    )
    run.add_argument(
        "--scheduler-file",
        metavar="FILE",
        help="connect to the cluster described by this scheduler file",
    )
    run.add_argument(
        "--io-threads",
        type=int,
        default=clusters.DEFAULT_IO_THREADS,
        help="threads (and io resource) of the I/O worker",
    )
    run.add_argument(
        "--cpu-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="single-threaded CPU worker processes",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="URLs per download/thumbnail node",
    )
    run.add_argument(
        "--window", type=int, default=0, help="batches in flight (0: from the cluster size)"
    )
    run.add_argument(
        "--dashboard-address",
        default=clusters.DEFAULT_DASHBOARD,
        help="where the Dask dashboard listens (a taken port falls back to a free one)",
    )
    run.add_argument("--report", metavar="FILE.html", help="write Dask's performance report there")

    net = p.add_argument_group("download")
    net.add_argument(
        "--timeout",
        type=float,
        default=DownloadSettings.deadline,
        help="total deadline per download, seconds",
    )
    net.add_argument(
        "--retries",
        type=int,
        default=DownloadSettings.retries,
        help="HTTP retries on connection errors, 408, 429, 5xx",
    )
    net.add_argument(
        "--max-bytes", type=int, default=DownloadSettings.max_bytes, help="largest body accepted"
    )
    net.add_argument("--user-agent", default=DownloadSettings.user_agent, help="User-Agent header")
    net.add_argument(
        "--per-host",
        type=int,
        default=DownloadSettings.per_host,
        help="concurrent requests per host per worker process",
    )

    p.add_argument(
        "--log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    return p


@dataclass(frozen=True)
class Job:
    """The parsed command line, as the settings objects the stages take."""

    cluster: clusters.ClusterSettings
    download: DownloadSettings
    thumb: ThumbSettings
    output: OutputSettings
    originals: OutputSettings | None
    source: SourceSettings | None  # None: the demo server
    count: int
    latency: float
    batch_size: int
    window: int
    report: str | None
    progress: bool
    log_level: str = "WARNING"


def parse_job(argv: list[str] | None = None) -> Job:
    args = build_parser().parse_args(argv)
    try:
        return job_from_args(args)
    except ValueError as exc:
        raise ArgumentError(str(exc)) from None


def job_from_args(args: argparse.Namespace) -> Job:
    if args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    if args.window < 0:
        raise ValueError(f"--window must be >= 0, got {args.window}")
    if args.latency < 0:
        raise ValueError(f"--latency must be >= 0, got {args.latency}")
    cluster = clusters.ClusterSettings(
        kind=args.scheduler,
        scheduler_file=args.scheduler_file,
        io_threads=args.io_threads,
        cpu_workers=args.cpu_workers,
        dashboard_address=args.dashboard_address,
    )
    if args.report and cluster.kind == "sync" and not cluster.is_remote:
        raise ValueError("--report needs a distributed scheduler; sync mode has no dashboard")
    if args.urls and "://" not in args.urls and not Path(args.urls).exists():
        raise ValueError(f"--urls: no such file: {args.urls}")
    return Job(
        cluster=cluster,
        download=DownloadSettings(
            deadline=args.timeout,
            retries=args.retries,
            max_bytes=args.max_bytes,
            user_agent=args.user_agent,
            per_host=args.per_host,
        ),
        thumb=ThumbSettings(
            size=parse_size(args.size), mode=args.mode, format=args.format, quality=args.quality
        ),
        output=OutputSettings(args.out),
        originals=OutputSettings(args.keep_originals) if args.keep_originals else None,
        source=SourceSettings(args.urls, column=args.url_column, batch_size=args.batch_size)
        if args.urls
        else None,
        count=args.count,
        latency=args.latency,
        batch_size=_positive("--batch-size", args.batch_size),
        window=args.window,
        report=args.report,
        progress=not args.no_progress,
        log_level=args.log_level,
    )


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


# --- the graph -------------------------------------------------------------------------


def batch_graph(
    batch: UrlBatch, download: DownloadSettings, job: JobSettings, token: str, route: bool
) -> Delayed:
    """One download node feeding one thumbnail node; keys named after the stage."""
    with _annotate(route, clusters.IO_RESOURCE):
        downloaded = dask.delayed(download_batch, pure=False)(
            batch, download, dask_key_name=f"download-{token}-{batch.batch_id}"
        )
    with _annotate(route, clusters.CPU_RESOURCE):
        return dask.delayed(thumbnail_batch, pure=False)(
            downloaded, job, dask_key_name=f"thumbnail-{token}-{batch.batch_id}"
        )


def _annotate(route: bool, resource: str) -> contextlib.AbstractContextManager:
    # retries: for infrastructure faults only (a lost worker); HTTP retries live in download.
    if not route:
        return dask.annotate(retries=2)
    return dask.annotate(resources={resource: 1}, retries=2)


@dataclass
class Tally:
    """What the client has heard back so far."""

    total: int | None
    started: float = field(default_factory=time.perf_counter)
    counts: Counter = field(default_factory=Counter)
    entries: int = 0
    download_s: float = 0.0
    thumbnail_s: float = 0.0
    downloaded: int = 0
    failed_batches: list[str] = field(default_factory=list)

    def add(self, report: BatchReport) -> None:
        self.counts.update(report.counts)
        self.entries += report.entries
        self.download_s += report.download_s
        self.thumbnail_s += report.thumbnail_s
        self.downloaded += sum(n for s, n in report.counts.items() if s not in NOT_FETCHED)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


NOT_FETCHED = ("invalid_url", "duplicate", "skipped")


def stream_batches(
    client: Client,
    batches: Iterable[UrlBatch],
    make_graph: callable,  # type: ignore[valid-type]
    window: int,
    tally: Tally,
    progress: Progress,
) -> None:
    """Keep ``window`` batches in flight; submit the next as each one finishes."""
    pending = iter(batches)
    futures = as_completed()
    for batch in _take(pending, window):
        futures.add(client.compute(make_graph(batch)))
    for future in futures:
        try:
            tally.add(future.result())
        except Exception as exc:  # a batch failed twice over: infrastructure, not data
            log.error("batch %s failed: %s", future.key, exc)
            tally.failed_batches.append(str(future.key))
        future.release()
        progress.show(tally)
        for batch in _take(pending, 1):
            futures.add(client.compute(make_graph(batch)))


def run_sync(
    batches: Iterable[UrlBatch], make_graph: callable, tally: Tally, progress: Progress
) -> None:  # type: ignore[valid-type]
    for batch in batches:
        (report,) = dask.compute(make_graph(batch), scheduler="sync")
        tally.add(report)
        progress.show(tally)


def _take(items: Iterator[UrlBatch], n: int) -> list[UrlBatch]:
    return list(itertools.islice(items, n))


def default_window(client: Client, batch_size: int) -> int:
    """Enough batches in flight to keep every CPU slot busy, and not many more."""
    info = client.scheduler_info(n_workers=-1)["workers"].values()
    slots = sum(w.get("nthreads", 1) for w in info if "io" not in (w.get("resources") or {}))
    # Measured on 2 cores, 1000 demo images at 100 ms latency: a window of 6 batches left
    # the CPU workers waiting on downloads (24 images/s), 16 kept them busy (52 images/s),
    # 32 gained nothing more. Each CPU slot needs ~4 batches: its own, and three downloading.
    return max(8, 4 * min(slots, 512) + 8)


class Progress:
    """images done / total and images per second, on one refreshed line."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.last = 0.0

    def show(self, tally: Tally, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.2 and not final):
            return
        self.last = now
        total = f"/{tally.total}" if tally.total else ""
        rate = tally.entries / max(tally.elapsed, 1e-9)
        ok = tally.counts.get("ok", 0)
        line = f"\r{tally.entries}{total} done, {ok} ok, {rate:.1f} images/s"
        print(line, end="\n" if final else "", file=sys.stderr, flush=True)


def summary(tally: Tally, job: Job) -> str:
    wall = tally.elapsed
    lines = ["", f"{'status':<22}{'count':>10}"]
    for status, n in sorted(tally.counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{status:<22}{n:>10}")
    lines.append(f"{'total':<22}{tally.entries:>10}")
    per = max(tally.downloaded, 1)
    lines += [
        "",
        f"wall time        {wall:.2f} s",
        f"images/s         {tally.entries / max(wall, 1e-9):.1f}",
        f"download / image {1000 * tally.download_s / per:.1f} ms (per URL, summed over workers)",
        f"thumbnail / image {1000 * tally.thumbnail_s / max(tally.counts.get('ok', 0), 1):.1f} ms",
        f"thumbnails       {job.output.root}",
        f"manifest         {job.output.root.rstrip('/')}/manifest/",
    ]
    if job.report:
        lines.append(f"report           {job.report}")
    if tally.failed_batches:
        lines.append(
            f"FAILED batches   {len(tally.failed_batches)}: {', '.join(tally.failed_batches[:5])}"
        )
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run(job: Job) -> Tally:
    """Run the whole job; returns what happened."""
    with contextlib.ExitStack() as stack:
        batches, total = open_source(job, stack)
        run_id = new_run_id()
        token = uuid.uuid4().hex[:8]
        node_job = JobSettings(job.thumb, job.output, run_id, job.originals)
        tally = Tally(total=total)
        progress = Progress(job.progress)
        print(f"outputs: {job.output.root}  (manifest: {job.output.root.rstrip('/')}/manifest/)")
        if job.cluster.kind == "sync" and not job.cluster.is_remote:
            run_sync(
                batches,
                lambda b: batch_graph(b, job.download, node_job, token, False),
                tally,
                progress,
            )
        else:
            client, cluster = clusters.connect(job.cluster)
            stack.callback(_close, client, cluster)
            route = clusters.has_routing(client)
            if job.cluster.is_remote and not route:
                print(
                    "note: the cluster's workers have no io/cpu resources: stages run unrestricted"
                )
            print(f"dashboard: {client.dashboard_link}")
            window = job.window or default_window(client, job.batch_size)
            if job.report:
                stack.enter_context(performance_report(filename=job.report))
            stream_batches(
                client,
                batches,
                lambda b: batch_graph(b, job.download, node_job, token, route),
                window,
                tally,
                progress,
            )
        progress.show(tally, final=True)
        if not tally.failed_batches:
            remove_older_parts(job.output, run_id)
        return tally


def open_source(job: Job, stack: contextlib.ExitStack) -> tuple[Iterator[UrlBatch], int | None]:
    if job.source is not None:
        return url_batches(job.source), None
    server = stack.enter_context(DemoServer(ServerSettings(latency=job.latency)))
    print(
        f"demo server: {server.base_url} ({job.count} images, {job.latency * 1000:.0f} ms latency)"
    )
    urls = server.urls(job.count)
    return batched(classify(urls), job.batch_size), len(urls)


def remove_older_parts(output: OutputSettings, run_id: str) -> None:
    """After a complete run the manifest holds this run's rows only."""
    from imgtasks.sinks import filesystem

    fs, root = filesystem(output)
    for part in manifest_parts(output):
        if f"part-{run_id}-" not in part:
            fs.rm(f"{root}/{part}")


def _close(client: Client, cluster: object) -> None:
    client.close()
    if cluster is not None:
        cluster.close()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    try:
        job = parse_job(argv)
    except ArgumentError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=job.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        tally = run(job)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        log.exception("run failed")
        print(f"run.py: internal error: {exc}", file=sys.stderr)
        return 1
    print(summary(tally, job))
    return 1 if tally.failed_batches else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
