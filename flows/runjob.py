"""The main job's command line, over ``imgtasks.thumbnails``: ``flows/run.py`` runs it.

argv -> settings -> one call -> the summary. The source is a URL list (``--urls``), Imgur's
gallery (``--imgur N``) or, by default, the embedded demo image server on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import dask.utils

import imgtasks
from imgtasks import cluster as clusters
from imgtasks import jobserver, preflight, workerstart
from imgtasks.demo import DemoServer, ServerSettings
from imgtasks.download import DownloadSettings
from imgtasks.imgur import (
    API_BASE,
    ImgurError,
    ImgurSettings,
    ImgurStats,
    client_id_from_env,
    imgur_links,
)
from imgtasks.shards import DEFAULT_SHARD_SIZE
from imgtasks.sinks import OutputSettings
from imgtasks.sources import SourceSettings
from imgtasks.thumbnail import ThumbSettings, parse_formats, parse_size

log = logging.getLogger("imgtasks.cli")

DEFAULT_COUNT = 1000
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
        help="URL list: .txt/.csv/.tsv/.parquet/.jsonl, optionally .gz; local or fsspec URL; "
        "with --read-on workers also a glob of lists ('s3://b/laion/*.parquet')",
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
    src.add_argument(
        "--caption-column",
        metavar="COL",
        help="column/key of the list carried to the manifest's caption column (and .txt)",
    )
    src.add_argument(
        "--keep-columns",
        metavar="A,B,C",
        default="",
        help="columns/keys of the list kept in the manifest (and .json), comma-separated",
    )
    src.add_argument(
        "--verify-hash-column",
        metavar="COL",
        help="column/key holding the sha256 of the expected bytes: a mismatch is status "
        "hash_mismatch and nothing is kept",
    )
    src.add_argument(
        "--read-on",
        default="client",
        choices=("client", "workers"),
        help="who reads --urls. client: this process reads, de-duplicates and batches every "
        "line; workers: the workers read the list's partitions (Parquet row groups, 4 MiB text "
        "blocks), this process sees only partition sizes and batch reports; the list must be "
        "an fsspec URL or a path the workers see; repeats are found within a partition only",
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
    out.add_argument(
        "--output-format",
        default="files",
        choices=("files", "webdataset", "parquet"),
        help="files: a thumbnail per image and the manifest; webdataset: NNNNN.tar shards "
        "(<key>.jpg/.json/.txt) with NNNNN.parquet and NNNNN_stats.json beside, as img2dataset "
        "writes them; parquet: NNNNN.parquet with the images in a binary column",
    )
    out.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        metavar="N",
        help="input lines per shard (webdataset, parquet)",
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
        "--formats",
        default="web",
        metavar="LIST",
        help="image formats decoded, others are recorded as unsupported_format: comma-separated "
        "Pillow names, 'web' (JPEG, MPO, PNG, GIF, WebP, AVIF, BMP) or 'all' (every format "
        "Pillow opens but EPS, which runs Ghostscript: name EPS to add it)",
    )
    out.add_argument(
        "--min-size",
        type=int,
        default=0,
        metavar="PX",
        help="an original whose shorter side is below PX is status too_small (0: no limit)",
    )
    out.add_argument(
        "--max-aspect-ratio",
        type=float,
        default=0.0,
        metavar="R",
        help="an original whose longer side / shorter side exceeds R is status "
        "bad_aspect_ratio (0: no limit)",
    )
    out.add_argument(
        "--keep-fitting",
        action="store_true",
        help="an image already in --format and inside the box is kept byte for byte, not "
        "re-encoded (its metadata too; the manifest's encoding column says 'original')",
    )
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
        "--scheduler-wait",
        type=float,
        default=preflight.SCHEDULER_WAIT_S,
        metavar="SECONDS",
        help="how long a remote scheduler (or its scheduler file) may take to appear",
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
        type=batch_size_arg,
        default="auto",
        help="URLs per download/thumbnail node; auto: 16 at first, then enough for ~0.25 s "
        "of thumbnail CPU each, up to 128 (16 when the workers read the input)",
    )
    run.add_argument(
        "--window",
        type=window_arg,
        default=0,
        help="batches in flight (0 or 'auto': sized by measurement, CPU throughput x "
        "download latency, within --max-inflight-bytes)",
    )
    run.add_argument(
        "--max-inflight-bytes",
        type=parse_bytes,
        default=None,
        metavar="BYTES",
        help="memory budget of the measured window, e.g. 512MiB, 2GB (default 512MiB)",
    )
    run.add_argument(
        "--dashboard-address",
        default=clusters.DEFAULT_DASHBOARD,
        help="where the Dask dashboard listens (a taken port falls back to a free one)",
    )
    run.add_argument("--report", metavar="FILE.html", help="write Dask's performance report there")
    run.add_argument(
        "--job-page-address",
        default=jobserver.DEFAULT_ADDRESS,
        metavar="127.0.0.1:PORT",
        help="the live job page is at <dashboard>/imgtasks with a local cluster; with a remote "
        "one this process serves it here (loopback only; a taken port moves to a free one)",
    )
    run.add_argument("--no-job-page", action="store_true", help="no live job page")
    run.add_argument(
        "--insecure",
        action="store_true",
        help="local clusters: plain TCP instead of TLS with a CA made for the run (then any "
        "user of this machine can connect to the scheduler and run code as you)",
    )
    for name, what in [
        ("--tls-ca-file", "the cluster CA's certificate"),
        ("--tls-cert", "this client's certificate, signed by that CA"),
        ("--tls-key", "this client's private key (if not in --tls-cert)"),
    ]:
        run.add_argument(
            name,
            metavar="PEM",
            help=f"a tls:// scheduler: {what} (default: Dask's distributed.comm.tls config)",
        )

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
    net.add_argument(
        "--user-agent",
        default=DownloadSettings.user_agent,
        help="User-Agent header (the token is added when it lacks it)",
    )
    net.add_argument(
        "--user-agent-token",
        default=DownloadSettings.user_agent_token,
        help="our name in X-Robots-Tag and robots.txt rules",
    )
    net.add_argument(
        "--disallowed-header-directives",
        default=",".join(DownloadSettings.disallowed_header_directives),
        metavar="LIST",
        help="X-Robots-Tag directives (for all agents or our token) that mean: keep nothing "
        "(status opted_out); an empty list turns the check off",
    )
    net.add_argument(
        "--respect-robots-txt",
        action="store_true",
        help="fetch each host's robots.txt (cached per worker process) and skip what it "
        "disallows our token (status robots_disallowed)",
    )
    net.add_argument(
        "--per-host-rate",
        type=float,
        metavar="R",
        help="at most R requests per second to one host per worker process (retries included)",
    )
    net.add_argument(
        "--per-host",
        type=int,
        metavar="N",
        help="most concurrent requests to one host per worker process: the ceiling of the "
        "adaptive limit (default 256), or with --per-host-fixed the fixed cap (default 16)",
    )
    net.add_argument(
        "--per-host-start",
        type=int,
        default=DownloadSettings.per_host_start,
        metavar="N",
        help="the adaptive per-host limit's first value; it grows while the host copes and "
        "shrinks on 429, 503, time-outs and rising latency",
    )
    limit = net.add_mutually_exclusive_group()
    limit.add_argument(
        "--per-host-fixed",
        action="store_true",
        help="a fixed per-host cap (--per-host, default 16) instead of the adaptive limit",
    )
    # the default since issue 19; accepted so that earlier command lines still run
    limit.add_argument("--per-host-adaptive", action="store_true", help=argparse.SUPPRESS)

    p.add_argument(
        "--log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--result-json",
        metavar="FILE",
        help="also write the run's figures (counts, wall time, ...) there as JSON",
    )
    return p


@dataclass(frozen=True)
class Job:
    """The parsed command line: where the URLs come from, and the API call's arguments."""

    options: dict[str, Any] = field(hash=False)  # keywords of imgtasks.thumbnails
    urls: str | None = None  # --urls; None: the demo server (or --imgur)
    count: int = DEFAULT_COUNT
    latency: float = 0.1
    demo_port: int = DEMO_PORT
    imgur: ImgurSettings | None = None
    imgur_count: int = 0
    log_level: str = "WARNING"
    result_json: str | None = None

    @property
    def cluster(self) -> clusters.ClusterSettings:
        return self.options["cluster"]


def parse_job(argv: list[str] | None = None) -> Job:
    args = build_parser().parse_args(argv)
    try:
        return job_from_args(args)
    except ValueError as exc:
        raise ArgumentError(str(exc)) from None


def job_from_args(args: argparse.Namespace) -> Job:
    _positive("--count", args.count)
    if args.window != "auto" and args.window < 0:
        raise ValueError(f"--window must be >= 0 or 'auto', got {args.window}")
    if args.latency < 0:
        raise ValueError(f"--latency must be >= 0, got {args.latency}")
    cluster = clusters.ClusterSettings(
        kind=args.scheduler,
        scheduler_file=args.scheduler_file,
        io_threads=args.io_threads,
        cpu_workers=args.cpu_workers,
        dashboard_address=args.dashboard_address,
        insecure=args.insecure,
        tls_ca_file=args.tls_ca_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        scheduler_wait=args.scheduler_wait,
    )
    jobserver.check_loopback(args.job_page_address)
    if args.report and cluster.kind == "sync" and not cluster.is_remote:
        raise ValueError("--report needs a distributed scheduler; sync mode has no dashboard")
    local = args.urls and "://" not in args.urls and "*" not in args.urls  # a glob: preflight
    if local and not Path(args.urls).exists():
        raise ValueError(f"--urls: no such file: {args.urls}")
    if args.read_on == "workers" and not args.urls:
        raise ValueError("--read-on workers reads a list: give --urls")
    if args.read_on == "workers" and cluster.kind == "sync" and not cluster.is_remote:
        raise ValueError("--read-on workers needs a distributed cluster, not --scheduler sync")
    imgur = None
    if args.imgur is not None:
        _positive("--imgur", args.imgur)
        imgur = ImgurSettings(client_id_from_env(args.imgur_client_id), api_base=args.imgur_api)
    options = {
        "out": args.out,
        "cluster": cluster,
        "url_column": args.url_column,
        "caption_column": args.caption_column,
        "keep_columns": tuple(n.strip() for n in args.keep_columns.split(",") if n.strip()),
        "verify_hash_column": args.verify_hash_column,
        "thumb": ThumbSettings(
            size=parse_size(args.size),
            mode=args.mode,
            format=args.format,
            quality=args.quality,
            source_formats=parse_formats(args.formats),
            min_size=args.min_size,
            max_aspect_ratio=args.max_aspect_ratio,
            keep_fitting=args.keep_fitting,
        ),
        "download": DownloadSettings(
            deadline=args.timeout,
            retries=args.retries,
            max_bytes=args.max_bytes,
            user_agent=args.user_agent,
            per_host=args.per_host,
            per_host_start=args.per_host_start,
            per_host_fixed=args.per_host_fixed,
            user_agent_token=args.user_agent_token,
            disallowed_header_directives=tuple(args.disallowed_header_directives.split(",")),
            respect_robots_txt=args.respect_robots_txt,
            per_host_rate=args.per_host_rate,
        ),
        "storage_options": parse_storage_options(args.storage_options),
        "keep_originals": args.keep_originals,
        "resume": args.resume,
        "output_format": args.output_format,
        "shard_size": _positive("--shard-size", args.shard_size),
        "batch_size": args.batch_size,
        "read_on": args.read_on,
        "window": args.window,
        "max_inflight_bytes": args.max_inflight_bytes,
        "report": args.report,
        "progress": not args.no_progress and sys.stderr.isatty(),
        "job_page": False if args.no_job_page else args.job_page_address,
    }
    return Job(
        options,
        urls=args.urls,
        count=args.count,
        latency=args.latency,
        demo_port=args.demo_port,
        imgur=imgur,
        imgur_count=args.imgur or 0,
        log_level=args.log_level,
        result_json=args.result_json,
    )


def parse_bytes(text: str) -> int:
    """``512MiB``, ``2GB``, ``1000000``: a positive number of bytes."""
    try:
        value = dask.utils.parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 byte: {text!r}")
    return value


def batch_size_arg(text: str) -> int | None:
    """``--batch-size``: a positive number, or ``auto`` (None: sized by measurement)."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def window_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'auto', not {text!r}") from None


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


# --- the source ------------------------------------------------------------------------


@contextlib.contextmanager
def url_source(job: Job) -> Iterator[Any]:
    """What to pass as ``urls``: the list's path, Imgur's links, or the demo server's URLs
    (the server running until the job ends)."""
    if job.urls is not None:
        yield job.urls
    elif job.imgur is not None:
        yield imgur_urls(job)
    else:
        server = start_demo_server(job)
        try:
            yield demo_urls(job, server)
        finally:
            server.stop()


def imgur_urls(job: Job) -> list[str]:
    assert job.imgur is not None
    print(f"imgur: up to {job.imgur_count} image links from {job.imgur.api_base}", flush=True)
    # At most max_pages x ~60 items: small enough to list before the cluster starts, so an
    # Imgur error stops the run before any work and the total is known.
    stats = ImgurStats()
    links = list(imgur_links(job.imgur, job.imgur_count, stats))
    albums_skipped = stats.albums_skipped + stats.albums_without_images
    print(
        f"imgur: {len(links)} links from {stats.pages} pages; albums expanded "
        f"{stats.albums_expanded}, skipped {albums_skipped}; videos skipped "
        f"{stats.videos_skipped}; duplicates {stats.duplicates}"
    )
    return links


def demo_urls(job: Job, server: DemoServer) -> list[str]:
    if job.cluster.is_remote:
        print(
            f"note: the demo server listens on {server.base_url} of this machine only; "
            "workers on other hosts cannot reach it (give them --urls)",
            file=sys.stderr,
        )
    print(
        f"demo server: {server.base_url} ({job.count} images, {job.latency * 1000:.0f} ms latency)"
    )
    return server.urls(job.count)


def start_demo_server(job: Job) -> DemoServer:
    """The embedded demo server on the fixed port if free, else on any free port."""
    for port in dict.fromkeys([job.demo_port, 0]):
        server = DemoServer(ServerSettings(port=port, latency=job.latency))
        try:
            return server.start()
        except OSError as exc:
            log.warning("demo port %d unavailable (%s); using a free port", port, exc)
    raise RuntimeError("the demo server could not start")


def check_setup(job: Job) -> None:
    storage = job.options["storage_options"]
    originals = job.options["keep_originals"]
    preflight.check(
        OutputSettings(job.options["out"], storage),
        originals=OutputSettings(originals, storage) if originals else None,
        source=SourceSettings(job.urls, storage_options=storage) if job.urls else None,
        cluster=job.cluster,
    )


# --- main --------------------------------------------------------------------------------


def show_progress_messages() -> None:
    """The library says where outputs go, the dashboard link and what resume found on the
    ``imgtasks.run`` logger; a command line prints them, whatever the log level."""
    said = logging.getLogger("imgtasks.run")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    said.addHandler(handler)
    said.setLevel(logging.INFO)
    said.propagate = False


def error_exit(exc: Exception) -> int:
    """One line on stderr; the traceback only at --log-level DEBUG."""
    log.debug("run failed", exc_info=exc)
    line, code = preflight.failure_line(exc)
    print(f"run.py: {line}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        job = parse_job(argv)
    except ArgumentError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=job.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    show_progress_messages()
    try:
        # Also checked inside thumbnails(); here first, so a bad --out or an unreachable
        # scheduler stops the run before the demo server or Imgur is even asked.
        check_setup(job)
        with url_source(job) as urls:
            result = imgtasks.thumbnails(urls, **job.options)
    except imgtasks.Interrupted as stop:
        # finished batches' manifest parts stay; writes are atomic, so nothing is partial
        print("\ninterrupted: finished batches are kept; rerun with --resume", file=sys.stderr)
        print(stop.result.summary())
        return 130
    except KeyboardInterrupt:  # before any batch went out
        print("\ninterrupted before the run started", file=sys.stderr)
        return 130
    except ImgurError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        return error_exit(exc)
    print(result.summary())
    if job.result_json:
        Path(job.result_json).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return 1 if result.failed_batches else 0


def entry() -> NoReturn:
    """``python flows/run.py``: Ctrl-C and SIGTERM stop the run cleanly; exits with its code."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # same clean stop as Ctrl-C
    code = main()
    workerstart.stop_fork_server()
    # Everything is written, closed and flushed: leave without the interpreter's teardown.
    # There Arrow's thread pool can abort the process ("terminate called without an active
    # exception", exit -6; apache/arrow#34314) after every row was written: 2 of 3 CI runs
    # in session 17. It also skips the last full collections over all that was imported
    # (dask, bokeh, pandas, pyarrow), measured at 0.30-0.44 s.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
