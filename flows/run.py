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
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import dask
from dask.delayed import Delayed
from distributed import Client, as_completed, performance_report

from imgtasks import cluster as clusters
from imgtasks import preflight
from imgtasks.contact_sheet import write_contact_sheet
from imgtasks.demo_server import DemoServer, ServerSettings
from imgtasks.download import DownloadSettings
from imgtasks.imgur import (
    API_BASE,
    ImgurError,
    ImgurSettings,
    ImgurStats,
    client_id_from_env,
    imgur_links,
)
from imgtasks.nodes import (
    BatchReport,
    JobSettings,
    download_batch,
    resume_batch,
    thumbnail_batch,
)
from imgtasks.sinks import (
    MANIFEST_DIR,
    OutputSettings,
    Record,
    filesystem,
    finished_rows,
    is_local,
    keep_only_run,
    sweep_temporaries,
    write_file,
)
from imgtasks.sources import SourceSettings, UrlBatch, batched, classify, url_batches
from imgtasks.thumbnail import ThumbSettings, parse_size

log = logging.getLogger("imgtasks.flow")

DEFAULT_COUNT = 1000
DEFAULT_BATCH_SIZE = 16
DEFAULT_OUT = "thumbnails"
DEMO_PORT = 8765
EXIT_CODES = (
    "exit codes: 0 done; 1 some batches failed, the scheduler or the storage is unavailable, "
    "or a bug; 2 a bad setting (the one-line message says what to fix or install); "
    "130 interrupted"
)


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
        epilog=EXIT_CODES,
    )
    src = p.add_argument_group("source (default: the embedded demo image server)")
    which = src.add_mutually_exclusive_group()
    which.add_argument(
        "--urls",
        metavar="PATH",
        help="URL list: .txt/.csv/.tsv/.parquet/.jsonl, optionally .gz; local or fsspec URL",
    )
    which.add_argument(
        "--imgur",
        type=int,
        metavar="N",
        help="the first N image links of Imgur's hot/viral/day gallery (albums expanded, "
        "videos skipped); needs a client id",
    )
    src.add_argument(
        "--imgur-client-id",
        metavar="ID",
        help="Imgur API client id (default: $IMGUR_CLIENT_ID)",
    )
    src.add_argument("--imgur-api", default=API_BASE, metavar="URL", help="Imgur API base")
    src.add_argument(
        "--url-column",
        default="url",
        help="column/key holding the URL in csv/tsv/parquet/jsonl lists",
    )
    src.add_argument("--count", type=int, default=DEFAULT_COUNT, help="demo: number of images")
    src.add_argument(
        "--latency", type=float, default=0.1, help="demo: injected latency per request, seconds"
    )
    src.add_argument(
        "--demo-port",
        type=int,
        default=DEMO_PORT,
        help="demo: port on 127.0.0.1 (a fixed port keeps URLs stable for --resume; "
        "a taken port falls back to a free one)",
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
        "--resume",
        action="store_true",
        help="skip URLs an earlier run into the same --out finished (ok row, file present)",
    )
    out.add_argument(
        "--storage-options",
        metavar="JSON",
        default="{}",
        help='fsspec options for --out/--keep-originals, e.g. \'{"endpoint_url": "http://..."}\'',
    )
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
    resume: bool = False
    demo_port: int = DEMO_PORT
    imgur: ImgurSettings | None = None  # --imgur: links from the Imgur gallery
    imgur_count: int = 0


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
    storage = parse_storage_options(args.storage_options)
    imgur = None
    if args.imgur is not None:
        _positive("--imgur", args.imgur)
        imgur = ImgurSettings(client_id_from_env(args.imgur_client_id), api_base=args.imgur_api)
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
        output=OutputSettings(args.out, storage),
        originals=OutputSettings(args.keep_originals, storage) if args.keep_originals else None,
        source=SourceSettings(
            args.urls,
            column=args.url_column,
            batch_size=args.batch_size,
            storage_options=storage,
        )
        if args.urls
        else None,
        count=args.count,
        latency=args.latency,
        batch_size=_positive("--batch-size", args.batch_size),
        window=args.window,
        report=args.report,
        progress=not args.no_progress,
        log_level=args.log_level,
        resume=args.resume,
        demo_port=args.demo_port,
        imgur=imgur,
        imgur_count=args.imgur or 0,
    )


def parse_storage_options(text: str) -> dict:
    try:
        options = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--storage-options is not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise ValueError("--storage-options must be a JSON object")
    return options


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


# --- the graph -------------------------------------------------------------------------


def batch_graph(
    batch: UrlBatch, wiring: Wiring, previous: Mapping[int, Record] | None = None
) -> Delayed:
    """One download node feeding one thumbnail node; keys named after the stage."""
    with _annotate(wiring.route, clusters.IO_RESOURCE):
        downloaded = dask.delayed(download_batch, pure=False)(
            batch, wiring.download, dask_key_name=f"download-{wiring.token}-{batch.batch_id}"
        )
    with _annotate(wiring.route, clusters.CPU_RESOURCE):
        return dask.delayed(thumbnail_batch, pure=False)(
            downloaded,
            wiring.job,
            previous or None,
            dask_key_name=f"thumbnail-{wiring.token}-{batch.batch_id}",
        )


@dataclass(frozen=True)
class Wiring:
    """What every batch's graph shares."""

    download: DownloadSettings
    job: JobSettings
    token: str  # makes this run's task keys unique on a shared cluster
    route: bool  # send stages to the io/cpu pools by resources
    done: Mapping[str, Record] = field(default_factory=dict, hash=False)  # --resume

    def graph(self, batch: UrlBatch) -> Delayed:
        batch, previous = resume_batch(batch, self.done)
        return batch_graph(batch, self, previous)


def _annotate(route: bool, resource: str) -> contextlib.AbstractContextManager:
    # retries: for infrastructure faults only (a lost worker); HTTP retries live in download.
    if not route:
        return dask.annotate(retries=2)
    return dask.annotate(resources={resource: 1}, retries=2)


@dataclass
class Tally:
    """What the client has heard back so far."""

    total: int | None = None
    started: float = field(default_factory=time.perf_counter)
    counts: Counter = field(default_factory=Counter)
    entries: int = 0
    download_s: float = 0.0
    thumbnail_s: float = 0.0
    downloaded: int = 0
    resumed: int = 0
    ready: float = 0.0  # seconds until the cluster was up and the first batch went out
    failed_batches: list[str] = field(default_factory=list)

    def add(self, report: BatchReport) -> None:
        self.resumed += report.resumed
        self.counts.update(report.counts)
        self.entries += report.entries
        self.download_s += report.download_s
        self.thumbnail_s += report.thumbnail_s
        fetched = sum(n for s, n in report.counts.items() if s not in NOT_FETCHED)
        self.downloaded += fetched - report.resumed

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


NOT_FETCHED = ("invalid_url", "duplicate")


def stream_batches(
    client: Client,
    batches: Iterable[UrlBatch],
    make_graph: Callable[[UrlBatch], Delayed],
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
            report = future.result()
        except Exception as exc:  # a batch failed twice over: infrastructure, not data
            log.error("batch %s failed: %s", future.key, exc)
            tally.failed_batches.append(str(future.key))
        else:
            tally.add(report)
            progress.batch_done(report)
        future.release()
        progress.show(tally)
        for batch in _take(pending, 1):
            futures.add(client.compute(make_graph(batch)))


def run_sync(
    batches: Iterable[UrlBatch],
    make_graph: Callable[[UrlBatch], Delayed],
    tally: Tally,
    progress: Progress,
) -> None:
    for batch in batches:
        (report,) = dask.compute(make_graph(batch), scheduler="sync")
        tally.add(report)
        progress.batch_done(report)
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
    """images done / total and images per second, on one refreshed line; a log line per batch."""

    def __init__(self, enabled: bool, batch_log: BatchLog | None) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.batch_log = batch_log
        self.last = 0.0

    def batch_done(self, report: BatchReport) -> None:
        if self.batch_log is not None:
            self.batch_log.write(report)

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


class BatchLog:
    """``<out>/run.log``: one line per finished batch (counts and seconds)."""

    def __init__(self, output: OutputSettings) -> None:
        self.output = output
        self.lines: list[str] = []
        self.file = None
        fs, root = filesystem(output)
        if is_local(fs):  # append as we go; remote outputs get the log at the end
            os.makedirs(root, exist_ok=True)
            self.file = open(os.path.join(root, "run.log"), "a", encoding="utf-8")  # noqa: SIM115

    def __enter__(self) -> BatchLog:
        self.line(f"run started, output {self.output.root}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.line("run ended" if exc[0] is None else f"run stopped: {exc[0].__name__}")  # type: ignore[union-attr]
        if self.file is not None:
            self.file.close()
        else:
            write_file(self.output, "run.log", "".join(self.lines).encode())

    def write(self, report: BatchReport) -> None:
        counts = " ".join(f"{k}={v}" for k, v in sorted(report.counts.items()))
        self.line(
            f"batch {report.batch_id} entries={report.entries} {counts} "
            f"download_s={report.download_wall_s:.3f} thumbnail_s={report.thumbnail_wall_s:.3f}"
        )

    def line(self, text: str) -> None:
        text = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n"
        if self.file is not None:
            self.file.write(text)
            self.file.flush()
        else:
            self.lines.append(text)


def summary(tally: Tally, job: Job) -> str:
    wall = tally.elapsed
    lines = ["", f"{'status':<22}{'count':>10}"]
    for status, n in sorted(tally.counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{status:<22}{n:>10}")
    lines.append(f"{'total':<22}{tally.entries:>10}")
    per = max(tally.downloaded, 1)
    if tally.resumed:
        lines.append(f"({tally.resumed} ok rows resumed from an earlier run, not fetched again)")
    lines += [
        "",
        f"wall time        {wall:.2f} s (cluster start-up {tally.ready:.2f} s)",
        f"images/s         {tally.entries / max(wall, 1e-9):.1f}",
        f"download / image {1000 * tally.download_s / per:.1f} ms (per URL, queueing excluded)",
        f"thumbnail / image {1000 * tally.thumbnail_s / max(tally.counts.get('ok', 0), 1):.1f} ms",
        f"thumbnails       {job.output.root}",
        f"manifest         {manifest_dir(job)}",
        f"run log          {job.output.root.rstrip('/')}/run.log",
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
    """UTC to the microsecond: manifest parts sort by run, and the latest row of a URL wins."""
    now = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9))
    return f"{stamp}.{now // 1000 % 10**6:06d}Z-{uuid.uuid4().hex[:6]}"


def run(job: Job, tally: Tally) -> None:
    """Run the whole job, counting what happens in ``tally`` (kept if interrupted)."""
    preflight.check(job.output, originals=job.originals, source=job.source, cluster=job.cluster)
    with contextlib.ExitStack() as stack:
        batches, tally.total = open_source(job, stack)
        run_id = new_run_id()
        done = resumable(job)
        wiring = Wiring(
            job.download,
            JobSettings(job.thumb, job.output, run_id, job.originals),
            token=uuid.uuid4().hex[:8],
            route=False,
            done=done,
        )
        batch_log = stack.enter_context(BatchLog(job.output))
        print(f"outputs: {job.output.root}  (manifest: {manifest_dir(job)})")
        tally.started = time.perf_counter()
        if job.cluster.kind == "sync" and not job.cluster.is_remote:
            run_sync(batches, wiring.graph, tally, Progress(job.progress, batch_log))
        else:
            client = start_client(job, stack)
            wiring = replace(wiring, route=clusters.has_routing(client))
            if job.cluster.is_remote and not wiring.route:
                print("note: the cluster's workers have no io/cpu resources: stages run anywhere")
            window = job.window or default_window(client, job.batch_size)
            tally.ready = tally.elapsed
            if job.report:
                stack.enter_context(performance_report(filename=job.report, mode="inline"))
            progress = Progress(job.progress, batch_log)
            stream_batches(client, batches, wiring.graph, window, tally, progress)
        Progress(job.progress, None).show(tally, final=True)
        if not tally.failed_batches:
            keep_only_run(job.output, run_id)
        sheet = contact_sheet(job, run_id)
        if sheet:
            print(f"contact sheet: {sheet}")


def contact_sheet(job: Job, run_id: str) -> str | None:
    """Write <out>/contact_sheet.jpg; never fails the run."""
    try:
        relpath = write_contact_sheet(job.output, run_id=run_id)
    except Exception as exc:
        log.warning("contact sheet not written: %s", exc)
        return None
    return None if relpath is None else f"{job.output.root.rstrip('/')}/{relpath}"


def start_client(job: Job, stack: contextlib.ExitStack) -> Client:
    client, cluster = clusters.connect(job.cluster)
    stack.callback(_close, client, cluster)
    print(f"dashboard: {client.dashboard_link}", flush=True)
    return client


def resumable(job: Job) -> dict[str, Record]:
    """--resume: the URLs an earlier run into the same output already finished."""
    if not job.resume:
        return {}
    done = finished_rows(job.output)
    swept = sweep_temporaries(job.output)
    print(f"resume: {len(done)} URLs already done in {job.output.root}", end="")
    print(f"; {swept} stale temporary files removed" if swept else "")
    return done


def manifest_dir(job: Job) -> str:
    return f"{job.output.root.rstrip('/')}/{MANIFEST_DIR}/"


def open_source(job: Job, stack: contextlib.ExitStack) -> tuple[Iterator[UrlBatch], int | None]:
    if job.source is not None:
        return url_batches(job.source), None
    if job.imgur is not None:
        print(f"imgur: up to {job.imgur_count} image links from {job.imgur.api_base}", flush=True)
        # At most max_pages x ~60 items: small enough to list before the cluster starts,
        # so an Imgur error stops the run before any work and the total is known.
        stats = ImgurStats()
        links = list(imgur_links(job.imgur, job.imgur_count, stats))
        albums_skipped = stats.albums_skipped + stats.albums_without_images
        print(
            f"imgur: {len(links)} links from {stats.pages} pages; albums expanded "
            f"{stats.albums_expanded}, skipped {albums_skipped}; videos skipped "
            f"{stats.videos_skipped}; duplicates {stats.duplicates}"
        )
        return batched(classify(links), job.batch_size), len(links)
    server = start_demo_server(job)
    stack.callback(server.stop)
    if job.cluster.is_remote:
        print(
            f"note: the demo server listens on {server.base_url} of this machine only; "
            "workers on other hosts cannot reach it (give them --urls)",
            file=sys.stderr,
        )
    print(
        f"demo server: {server.base_url} ({job.count} images, {job.latency * 1000:.0f} ms latency)"
    )
    urls = server.urls(job.count)
    return batched(classify(urls), job.batch_size), len(urls)


def start_demo_server(job: Job) -> DemoServer:
    """The embedded demo server on the fixed port if free, else on any free port."""
    for port in dict.fromkeys([job.demo_port, 0]):
        server = DemoServer(ServerSettings(port=port, latency=job.latency))
        try:
            return server.start()
        except OSError as exc:
            log.warning("demo port %d unavailable (%s); using a free port", port, exc)
    raise RuntimeError("the demo server could not start")


def _close(client: Client, cluster: object) -> None:
    client.close()
    if cluster is not None:
        cluster.close()  # type: ignore[attr-defined]


def error_exit(exc: Exception) -> int:
    """One line on stderr and the exit code: a setup problem says what to do (2: a bad
    setting, 1: something unavailable), anything else is a bug. Tracebacks at DEBUG only."""
    log.debug("run failed", exc_info=exc)
    setup = preflight.explain(exc)
    if setup is not None:
        print(f"run.py: error: {setup}", file=sys.stderr)
        return setup.exit_code
    print(f"run.py: internal error: {exc} (--log-level DEBUG shows where)", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    try:
        job = parse_job(argv)
    except ArgumentError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=job.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    tally = Tally()
    try:
        run(job, tally)
    except KeyboardInterrupt:
        # finished batches' manifest parts stay; writes are atomic, so nothing is partial
        print("\ninterrupted: finished batches are kept; rerun with --resume", file=sys.stderr)
        print(summary(tally, job))
        return 130
    except ImgurError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        return error_exit(exc)
    print(summary(tally, job))
    return 1 if tally.failed_batches else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # same clean stop as Ctrl-C
    sys.exit(main())
