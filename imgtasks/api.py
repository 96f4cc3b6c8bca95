"""The public API: :func:`thumbnails` runs the whole job and returns a :class:`Result`.

``flows/run.py`` is a command line over this function; a notebook calls it directly,
with its own Dask client or without one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field, fields, replace
from typing import Any

from distributed import default_client, performance_report

from imgtasks import cluster as clusters
from imgtasks import jobserver, preflight
from imgtasks.contact_sheet import write_contact_sheet
from imgtasks.download import DownloadSettings
from imgtasks.flow import (
    Progress,
    Tally,
    Wiring,
    measured_window,
    new_run_id,
    run_sync,
    run_sync_shards,
    stream_batches,
)
from imgtasks.jobfeed import JobFeed
from imgtasks.manifest import (
    MANIFEST_DIR,
    MANIFEST_SCHEMA,
    finished_rows,
    keep_only_run,
    manifest_parts,
    read_manifest,
)
from imgtasks.nodes import JobSettings
from imgtasks.runlog import RUN_LOG, BatchLog
from imgtasks.shards import (
    DEFAULT_SHARD_SIZE,
    ShardSettings,
    finished_shards,
    manifest_view,
    shard_counts,
    shard_files,
)
from imgtasks.sinks import (
    TEMP_PREFIX,
    OutputSettings,
    filesystem,
    is_local,
    sweep_temporaries,
    write_atomic,
)
from imgtasks.sources import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_COLUMN,
    NO_COLUMNS,
    InputColumns,
    SourceSettings,
    UrlBatch,
    batched,
    classify,
    dtype_kind,
    kept_kinds,
    url_batches,
)
from imgtasks.status import Status
from imgtasks.thumbnail import ThumbSettings
from imgtasks.window import BatchSizing
from imgtasks.worker_input import WorkerInput, reads_on_workers

log = logging.getLogger(__name__)
# What a person running the job wants to see (where outputs go, the dashboard link, what
# resume found): INFO on this logger. flows/run.py prints it on stdout.
say = logging.getLogger("imgtasks.run").info

URLs = Any  # a path or fsspec URL, an iterable of str, a pandas or dask DataFrame/Series


@dataclass(frozen=True)
class Result:
    """What one call of :func:`thumbnails` did."""

    counts: Mapping[str, int]  # manifest rows per status, e.g. {"ok": 998, "http_4xx": 2}
    entries: int  # input lines handled (one manifest row each)
    wall_s: float  # from the call to the last batch, cluster start-up included
    startup_s: float  # until the scheduler was up and the first batch went out
    output: OutputSettings
    run_id: str
    failed_batches: tuple[str, ...] = ()  # nodes that failed every retry (rows: batch_failed)
    resumed: int = 0  # ok rows carried over from an earlier run (resume=True)
    downloaded: int = 0  # URLs fetched by this run
    download_s: float = 0.0  # summed over URLs, waits for a per-host slot excluded
    thumbnail_s: float = 0.0  # summed over URLs
    thumbnail_wall_s: float = 0.0  # summed over batches: how long the CPU pool was busy
    batches: int = 0  # batches done (download and thumbnail node pairs)
    largest_batch: int = 0  # input lines in the largest
    dashboard_link: str | None = None
    report: str | None = None  # Dask's performance report, when asked for
    contact_sheet: str | None = None
    interrupted: bool = False
    total: int | None = field(default=None, repr=False)  # input lines, when known up front
    failed_hosts: Mapping[str, int] = field(default_factory=dict)  # top 10: download failures
    # The job page's figures (imgtasks.jobfeed): top 10 failures by kind, bytes downloaded.
    errors: Mapping[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    job_page: str | None = None  # the live page's link (imgtasks.job_page: inline in Jupyter)
    output_format: str = "files"  # or "webdataset", "parquet": shards under out/

    @property
    def ok(self) -> int:
        return self.counts.get(Status.OK, 0)

    @property
    def images_per_s(self) -> float:
        return self.entries / max(self.wall_s, 1e-9)

    @property
    def out(self) -> str:
        return self.output.root

    @property
    def manifest_dir(self) -> str:
        """Where the per-URL rows are: the manifest, or the shards' parquet files."""
        if self.output_format != "files":
            return f"{self.output.root.rstrip('/')}/"
        return f"{self.output.root.rstrip('/')}/{MANIFEST_DIR}/"

    @property
    def run_log(self) -> str:
        return f"{self.output.root.rstrip('/')}/{RUN_LOG}"

    def manifest(self, lazy: bool = False) -> Any:
        """The manifest: one current row per input line (the latest run's row wins).

        A pandas DataFrame; ``lazy=True``: a dask DataFrame over every part, unread (it
        holds earlier runs' rows too when a run failed or resumed part-way). With shards,
        the shards' rows in the manifest's names (their files use img2dataset's).
        """
        if self.output_format != "files":
            return _shard_rows(self.output, lazy)
        if lazy:
            import dask.dataframe as dd

            return dd.read_parquet(
                self.manifest_dir, storage_options=dict(self.output.storage_options) or None
            )
        table = read_manifest(self.output, manifest_parts(self.output))
        frame = table.to_pandas() if table.num_rows else MANIFEST_SCHEMA.empty_table().to_pandas()
        # Parts sort by run: an input line's latest row wins (earlier runs' parts remain
        # after a failed or interrupted run). Repeated URLs are lines of their own.
        return frame.drop_duplicates(["index", "url"], keep="last").reset_index(drop=True)

    def to_dict(self) -> dict[str, Any]:
        """The figures as plain JSON-able values (``flows/run.py --result-json``)."""
        figures = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "output"}
        return {
            **figures,
            "counts": dict(self.counts),
            "failed_batches": list(self.failed_batches),
            "failed_hosts": dict(self.failed_hosts),
            "errors": dict(self.errors),
            "out": self.out,
            "manifest_dir": self.manifest_dir,
            "ok": self.ok,
            "images_per_s": self.images_per_s,
        }

    def summary(self) -> str:
        """The end-of-run table that ``flows/run.py`` prints."""
        lines = ["", f"{'status':<22}{'count':>10}"]
        for status, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"{status:<22}{n:>10}")
        lines.append(f"{'total':<22}{self.entries:>10}")
        if self.resumed:
            lines.append(f"({self.resumed} ok rows resumed from an earlier run, not fetched again)")
        per_thumb = max(self.ok, 1)
        lines += [
            "",
            f"wall time        {self.wall_s:.2f} s (cluster start-up {self.startup_s:.2f} s)",
            f"images/s         {self.images_per_s:.1f}",
            f"download / image {1000 * self.download_s / max(self.downloaded, 1):.1f} ms "
            "(per URL, queueing excluded)",
            f"thumbnail / image {1000 * self.thumbnail_s / per_thumb:.1f} ms",
            f"batches          {self.batches} (up to {self.largest_batch} URLs each)",
            f"thumbnails       {self.out}",
            f"manifest         {self.manifest_dir}",
            f"run log          {self.run_log}",
        ]
        if self.report:
            lines.append(f"report           {self.report}")
        if self.failed_hosts:
            shown = ", ".join(f"{host} ({n})" for host, n in self.failed_hosts.items())
            lines.append(f"failing hosts    {shown}")
        if self.failed_batches:
            shown = ", ".join(self.failed_batches[:5])
            lines.append(f"FAILED batches   {len(self.failed_batches)}: {shown}")
        return "\n".join(lines)


OUTPUT_FORMATS = ("files", "webdataset", "parquet")
IMAGE_COLUMNS = ("jpg", "png", "webp")  # the parquet format's image bytes, by extension


def _shard_rows(output: OutputSettings, lazy: bool) -> Any:
    """The rows of every finished shard, images left out (pandas, or dask when lazy)."""
    import pandas as pd

    root = output.root.rstrip("/")
    paths = [f"{root}/{relpath}" for relpath in shard_files(output)]
    options = dict(output.storage_options) or None
    read = pd.read_parquet
    if lazy:
        import dask.dataframe as dd

        read = dd.read_parquet
    frame = read(paths, storage_options=options) if paths else pd.DataFrame(columns=["key"])
    frame = frame.drop(columns=[c for c in frame.columns if c in IMAGE_COLUMNS])
    return manifest_view(frame) if paths else frame


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or a notebook's stop button) during :func:`thumbnails`. Finished batches
    are kept (their manifest parts are whole); ``result`` says what was done, and a call
    with ``resume=True`` does the rest."""

    def __init__(self, result: Result) -> None:
        super().__init__("interrupted: finished batches are kept; run again with resume")
        self.result = result


def thumbnails(
    urls: URLs,
    out: str | os.PathLike[str] | OutputSettings = "thumbnails",
    *,
    client: Any = None,
    cluster: clusters.ClusterSettings | str | None = None,
    url_column: str = DEFAULT_COLUMN,
    caption_column: str | None = None,
    keep_columns: Iterable[str] = (),
    verify_hash_column: str | None = None,
    output_format: str = "files",
    shard_size: int = DEFAULT_SHARD_SIZE,
    size: tuple[int, int] | None = None,
    mode: str | None = None,
    format: str | None = None,
    quality: int | None = None,
    thumb: ThumbSettings | None = None,
    download: DownloadSettings | None = None,
    storage_options: Mapping[str, Any] | None = None,
    keep_originals: str | os.PathLike[str] | None = None,
    resume: bool = False,
    batch_size: int | None = None,
    read_on: str = "auto",
    window: int | str = 0,
    max_inflight_bytes: int | None = None,
    report: str | None = None,
    progress: bool = True,
    job_page: bool | str = True,
) -> Result:
    """Download every URL, write a thumbnail of each image and a manifest row per URL.

    Args:
        urls: the URLs. A path or fsspec URL of a list (.txt/.csv/.tsv/.parquet/.jsonl,
            optionally .gz; read lazily), any iterable of URL strings, a pandas DataFrame
            or Series, or a dask DataFrame or Series (its partitions read by the workers,
            see ``read_on``; never collected on the client). Each item is one input line:
            invalid and repeated URLs get rows too (``invalid_url``, ``duplicate``).
        out: where thumbnails (``ab/<sha256 of the URL>.jpg``), the manifest
            (``manifest/part-*.parquet``), ``run.log`` and ``contact_sheet.jpg`` go: a local
            directory or an fsspec URL (``s3://bucket/thumbs``); or ``OutputSettings``,
            e.g. to set ``manifest_part_rows`` (rows per compacted manifest part, 10,000).
        client: a ``distributed.Client`` to run on; it is never closed. None: the current
            default client if there is one, else the cluster ``cluster`` names is started
            and closed at the end.
        cluster: used when no client is given (or to override a default client): a
            ``ClusterSettings``, or its kind as a string: ``"hybrid"`` (default: one I/O
            worker with threads + single-threaded CPU worker processes), ``"processes"``,
            ``"threads"``, ``"sync"`` (no cluster, for debugging) or a scheduler address
            like ``"tcp://host:8786"``. Local clusters speak TLS with a CA made for the
            run (``ClusterSettings(insecure=True)``: plain TCP); a ``tls://`` scheduler
            takes ``ClusterSettings(tls_ca_file=..., tls_cert=..., tls_key=...)`` or
            Dask's ``distributed.comm.tls`` config.
        url_column: the column or key holding the URL (csv/tsv/parquet/jsonl, DataFrames).
        caption_column: a column of the input (csv/tsv/parquet/jsonl, DataFrames) written
            to the manifest's ``caption`` column.
        keep_columns: input columns written to the manifest as columns of their own
            (Parquet's and DataFrames' types kept; text from csv/tsv/jsonl).
        output_format: ``"files"`` (default: a thumbnail file per image and the manifest),
            ``"webdataset"`` (``00000.tar`` ... with ``<key>.jpg``, ``.json``, ``.txt``,
            beside each a ``00000.parquet`` of every input line and ``00000_stats.json``,
            as img2dataset lays them out) or ``"parquet"`` (the images in a binary column
            of ``00000.parquet`` ...).
        shard_size: input lines per shard (webdataset/parquet); default 10,000.
        verify_hash_column: a column holding the sha256 (hex) of the expected bytes; a
            body that differs gets status ``hash_mismatch`` and nothing is kept.
        size: thumbnail box (width, height); default (128, 128).
        mode: ``"fit"`` (default: inside the box, never upscaled), ``"crop"`` or ``"pad"``.
        format: ``"jpeg"`` (default), ``"png"`` or ``"webp"``.
        quality: JPEG/WebP quality 1-100; default 90.
        thumb: all thumbnail settings at once (instead of size/mode/format/quality), e.g.
            to widen the decoded formats or the pixel limit.
        download: ``DownloadSettings``: deadline, retries, size cap, User-Agent, per-host
            concurrency. Default: ``DownloadSettings()``.
        storage_options: fsspec options for ``out``, ``keep_originals`` and a ``urls`` path.
        keep_originals: also keep the downloaded files there (directory or fsspec URL).
        resume: skip the URLs an earlier run into the same ``out`` finished (``ok`` row,
            thumbnail present); their rows are carried over.
        batch_size: URLs per download node and thumbnail node. None: chosen as the run
            goes, 16 at first, then enough for ~0.25 s of thumbnail CPU each, up to 128
            (``window.BatchSizing``); when the workers read the input, 16.
        read_on: who reads ``urls``. ``"client"``: this process reads, numbers,
            de-duplicates and batches every line. ``"workers"``: a list file (local to the
            workers, or an fsspec URL) or a dask DataFrame is read by the workers, partition
            by partition (Parquet row groups, 4 MiB blocks of text lines, DataFrame
            partitions; a glob ``"s3://b/part-*.parquet"`` of lists too); this process
            only sees partition sizes and batch reports.
            ``index`` stays the line's number in the whole input; repeats are found within
            a partition only (see ``imgtasks.partitions``); output_format ``"files"``.
            ``"auto"`` (default): the workers for a dask DataFrame on a distributed
            cluster, else the client.
        window: batches in flight; 0 (or ``"auto"``): sized by measurement (Little's law:
            the CPU pool's throughput times the download time of a batch; see
            ``imgtasks.window``), starting from the cluster's size (4 per CPU slot + 8).
        max_inflight_bytes: memory budget of the measured window: downloaded bytes in
            flight at most about this (default 512 MiB).
        report: write Dask's performance report (HTML) to this file.
        progress: show a progress bar (a terminal line, or a widget in Jupyter).
        job_page: serve the live job page (progress, counts, rates, failures, the latest
            thumbnails): on the Dask dashboard at ``/imgtasks`` when the scheduler runs in
            this process, else from this process on ``"127.0.0.1:PORT"`` (this string, or
            ``imgtasks.jobserver.DEFAULT_ADDRESS``; loopback only). False: none.

    Returns:
        A :class:`Result`: counts per status, wall time, images/s, where the outputs are,
        failed batches; ``result.manifest()`` reads the manifest.

    Raises:
        ValueError: a bad argument, before any work.
        SetupError: the output cannot be written, the URL list or the scheduler is not
            there, a filesystem package is missing: one line saying what to do, before
            any work (``exit_code``: 2 for a setting to fix, 1 for something unavailable).
        Interrupted: on KeyboardInterrupt, after finished batches are kept; its
            ``result`` holds what was done.
    """
    output = _output_settings(out, storage_options)
    columns = InputColumns(caption_column, _names(keep_columns), verify_hash_column)
    if window != "auto" and not (isinstance(window, int) and window >= 0):
        raise ValueError(f"window must be >= 0 or 'auto', got {window!r}")
    if max_inflight_bytes is not None and max_inflight_bytes < 1:
        raise ValueError(f"max_inflight_bytes must be >= 1, got {max_inflight_bytes}")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}; got {output_format!r}")
    sizing = BatchSizing() if batch_size is None else None
    fixed_size = DEFAULT_BATCH_SIZE if batch_size is None else _positive("batch_size", batch_size)
    listing = url_list(urls, url_column, fixed_size, output, columns)
    if isinstance(job_page, str):
        jobserver.check_loopback(job_page)
    how = _Execution(
        client,
        _cluster_settings(cluster),
        window,
        report,
        progress,
        resume,
        job_page,
        max_inflight_bytes,
    )
    sync = client is None and how.cluster is not None and how.cluster.kind == "sync"
    sync = sync and not how.cluster.is_remote
    remote = reads_on_workers(read_on, urls, listing, sync, output_format != "files")
    # Before anything starts: an unwritable output or a scheduler that does not answer is a
    # one-line SetupError in seconds, not a traceback after the cluster's start-up.
    originals = (
        OutputSettings(os.fspath(keep_originals), output.storage_options)
        if keep_originals is not None
        else None
    )
    preflight.check(
        output,
        originals=originals,
        source=listing,
        cluster=how.cluster if client is None else None,
    )
    job = JobSettings(
        _thumb_settings(thumb, size, mode, format, quality),
        output,
        run_id=new_run_id(),
        originals=originals,
        kept=_kept(urls, listing, columns, remote),
        keep_names=columns.keep,
        shards=None if output_format == "files" else ShardSettings(output_format, shard_size),
    )
    every = job.shards.size if job.shards else 0
    if remote:
        selected = listing or _columns(urls, url_column, columns.names)
        batches, total, sizing = _worker_input(selected, columns, fixed_size), None, None
    elif listing is not None:
        batches, total = url_batches(listing, every, sizing), None
    else:
        batches, total = url_values(urls, url_column, sizing or fixed_size, columns, every)
    download = download or DownloadSettings()
    if not download.disallowed_header_directives:
        log.warning(
            "X-Robots-Tag opt-outs are not checked: images whose owners said noai or noindex "
            "will be kept"
        )
    return _run(batches, total, job, download, how, sizing)


@dataclass(frozen=True)
class _Execution:
    client: Any
    cluster: clusters.ClusterSettings | None
    window: int | str
    report: str | None
    progress: bool
    resume: bool
    job_page: bool | str = True
    max_inflight_bytes: int | None = None


def _run(
    batches: Iterator[UrlBatch] | WorkerInput,
    total: int | None,
    job: JobSettings,
    download: DownloadSettings,
    how: _Execution,
    sizing: BatchSizing | None = None,
) -> Result:
    tally = Tally(total=total)
    feed = JobFeed(job.output, job.run_id, total)
    links: dict[str, str | None] = {"dashboard": None, "sheet": None, "job_page": None}
    joining: clusters.Joining | None = None
    try:
        with contextlib.ExitStack() as stack:
            wiring = Wiring(download, job, done=_resumable(job, how.resume))
            batches = _unfinished_shards(batches, job, how.resume, tally)
            say("outputs: %s  (manifest: %s/%s/)", job.output.root, job.output.root, MANIFEST_DIR)
            tally.started = time.perf_counter()
            client, joining = _client(how, stack)
            if client is not None and joining is None:  # our local workers share our disk
                _check_shared_disk(client, job)
            batch_log = stack.enter_context(BatchLog(job.output))  # after: not on a refused --out
            links["job_page"] = _job_page(client, feed, how, stack)
            feed.start()
            progress = Progress(how.progress, total, batch_log, watchers=[feed.add])
            stack.callback(progress.close)
            if client is None:
                (run_sync_shards if job.shards else run_sync)(batches, wiring, tally, progress)
            else:
                links["dashboard"] = client.dashboard_link
                wiring = _routed(wiring, client, how, joining)
                if isinstance(batches, WorkerInput):  # the workers read the input
                    wiring, batches = batches.start(client, wiring)
                window = (
                    how.window
                    if isinstance(how.window, int) and how.window > 0
                    else measured_window(
                        client, how.max_inflight_bytes, joining.slots if joining else None
                    )
                )
                tally.ready = tally.elapsed
                if how.report:
                    stack.enter_context(performance_report(filename=how.report, mode="inline"))
                stream_batches(client, batches, wiring, window, tally, progress, sizing)
    except KeyboardInterrupt:
        raise Interrupted(_result(tally, feed, job, how, links, interrupted=True)) from None
    except Exception as exc:
        _raise_failed_start(joining, exc)
        raise
    _raise_failed_start(joining, None)
    if not tally.failed_batches:
        keep_only_run(job.output, job.run_id)
    links["sheet"] = None if job.shards else _contact_sheet(job)
    return _result(tally, feed, job, how, links)


def _result(
    tally: Tally,
    feed: JobFeed,
    job: JobSettings,
    how: _Execution,
    links: Mapping[str, str | None],
    interrupted: bool = False,
) -> Result:
    figures = feed.figures()  # the job page's: failing hosts and errors counted once
    return Result(
        counts={str(status): n for status, n in tally.counts.items()},
        entries=tally.entries,
        wall_s=tally.elapsed,
        startup_s=tally.ready,
        output=job.output,
        run_id=job.run_id,
        failed_batches=tuple(tally.failed_batches),
        resumed=tally.resumed,
        downloaded=tally.downloaded,
        download_s=tally.download_s,
        thumbnail_s=tally.thumbnail_s,
        thumbnail_wall_s=tally.thumbnail_wall_s,
        batches=tally.batches,
        largest_batch=tally.largest_batch,
        dashboard_link=links["dashboard"],
        report=how.report,
        contact_sheet=links["sheet"],
        interrupted=interrupted,
        total=tally.total,
        failed_hosts=dict(figures.failed_hosts),
        errors=dict(figures.errors),
        bytes_in=figures.bytes_in,
        job_page=links["job_page"],
        output_format=job.shards.format if job.shards else "files",
    )


def _client(how: _Execution, stack: contextlib.ExitStack) -> tuple[Any, clusters.Joining | None]:
    """The client to run on (None: Dask's synchronous scheduler in this thread), and the
    workers still joining the local cluster started here (None: any other cluster).

    The run starts as soon as our cluster's scheduler is up: on the demo run (1000
    images, 100 ms) the first batch went out 0.16-0.30 s after the call instead of
    1.7-3.3 s, the workers' start overlapping the first downloads (benchmarks/README.md,
    "Start-up and shutdown")."""
    if how.client is not None:
        return how.client, None  # the caller's: never closed here
    settings = how.cluster
    if settings is None:
        with contextlib.suppress(ValueError):  # no default client
            return default_client(), None
        settings = clusters.ClusterSettings()
    if settings.kind == "sync" and not settings.is_remote:
        return None, None
    stack.enter_context(clusters.run_config())  # until the cluster is closed
    client, cluster, joining = clusters.connect_early(settings)
    stack.callback(_close, client, cluster)
    if joining is not None:
        _stop_on_failed_start(joining, client)
    say("dashboard: %s", client.dashboard_link)
    return client, joining


def _stop_on_failed_start(joining: clusters.Joining, client: Any) -> None:
    """A worker that does not start stops the run: the client is closed, so what waits for
    a worker is cancelled and what is submitted next fails at once (no run waits for a
    worker that will not come); ``_run`` then raises ``_raise_failed_start``'s error."""

    def stop(joined: Any) -> None:
        if joining.failure() is not None:  # on the cluster's loop: close from a thread
            threading.Thread(target=client.close, name="imgtasks-failed-start").start()

    joining.joined.add_done_callback(stop)


def _raise_failed_start(joining: clusters.Joining | None, exc: BaseException | None) -> None:
    """A local worker that did not start: one line (the run stopped, or never needed it)."""
    failure = joining.failure() if joining is not None else None
    if failure is None:
        return
    raise preflight.SetupError(
        f"a worker of the local {joining.settings.kind} cluster did not start: "
        f"{type(failure).__name__}: {failure}"
        + (f" ({failure.__cause__})" if failure.__cause__ else ""),
        preflight.UNAVAILABLE,
    ) from exc or failure


def _check_shared_disk(client: Any, job: JobSettings) -> None:
    """A local output on a cluster must be one directory every worker sees, else each worker
    writes to its own host's disk and the manifest, contact sheet and --resume here find
    nothing (tests/test_multihost.py). A marker written here is looked for by every worker:
    one ``client.run``, measured 3.6 ms of client CPU (30 ms wall, 3 local workers, 2 busy
    cores)."""
    for label, output in (("--out", job.output), ("--keep-originals", job.originals)):
        if output is None:
            continue
        fs, root = filesystem(output)
        if not is_local(fs):
            continue
        marker = f"{TEMP_PREFIX}shared-{job.run_id}"  # swept like any temporary if we die
        write_atomic(fs, f"{root}/{marker}", b"")
        try:
            blind = clusters.workers_without_file(client, output, marker)
        finally:
            fs.rm_file(f"{root}/{marker}")
        if blind:
            raise preflight.SetupError(
                f"{label} {output.root}: a local directory that {len(blind)} worker(s) "
                f"({', '.join(blind[:3])}) do not see; on a cluster give object storage "
                "(s3://...) or a directory shared by every host at the same path"
            )


def _job_page(
    client: Any, feed: JobFeed, how: _Execution, stack: contextlib.ExitStack
) -> str | None:
    """Serve the job page and show this job on it; never fails the run."""
    if how.job_page is False:
        return None
    address = how.job_page if isinstance(how.job_page, str) else jobserver.DEFAULT_ADDRESS
    try:
        page = jobserver.serve(client, address)
    except Exception as exc:
        log.warning("job page not served: %s", exc)
        return None
    if client is None or how.client is None:  # a page server of ours goes with the job
        stack.callback(page.close)
    stack.enter_context(jobserver.showing(page, feed))
    say("job page: %s", page.url)
    return page.url


def _routed(
    wiring: Wiring, client: Any, how: _Execution, joining: clusters.Joining | None
) -> Wiring:
    route = joining.routes if joining is not None else clusters.has_routing(client)
    if not route and (how.client is not None or how.cluster is None or how.cluster.is_remote):
        say("note: the cluster's workers have no io/cpu resources: stages run anywhere")
    return replace(wiring, route=route)


def _close(client: Any, cluster: Any) -> None:
    client.close()
    if cluster is not None:
        cluster.close()


def _unfinished_shards(
    batches: Iterator[UrlBatch], job: JobSettings, resume: bool, tally: Tally
) -> Iterator[UrlBatch]:
    """resume with shards: the batches of shards an earlier run finished (stats file
    present) are skipped, no request made; their stats count as this run's."""
    if not (resume and job.shards):
        return batches
    done = finished_shards(job.output)
    for stats in done.values():
        tally.counts.update(shard_counts(stats))
        tally.entries += int(stats.get("count", 0))
        tally.resumed += int(stats.get("successes", 0))
    swept = sweep_temporaries(job.output)
    say(
        "resume: %d shards already done in %s (%d stale temporaries removed)",
        len(done),
        job.output.root,
        swept,
    )
    shards = job.shards
    return (b for b in batches if shards.shard_of(b.entries[0].index) not in done)


def _resumable(job: JobSettings, resume: bool) -> dict:
    """resume: the URLs an earlier run into the same output already finished."""
    output = job.output
    if not resume or job.shards:
        return {}
    done = finished_rows(output)
    swept = sweep_temporaries(output)
    tail = f"; {swept} stale temporary files removed" if swept else ""
    say("resume: %d URLs already done in %s%s", len(done), output.root, tail)
    return done


def _contact_sheet(job: JobSettings) -> str | None:
    """Write <out>/contact_sheet.jpg; never fails the run."""
    try:
        relpath = write_contact_sheet(job.output, run_id=job.run_id)
    except Exception as exc:
        log.warning("contact sheet not written: %s", exc)
        return None
    if relpath is None:
        return None
    where = f"{job.output.root.rstrip('/')}/{relpath}"
    say("contact sheet: %s", where)
    return where


# --- arguments ----------------------------------------------------------------------------


def url_list(
    urls: URLs,
    column: str,
    batch_size: int,
    output: OutputSettings,
    columns: InputColumns = NO_COLUMNS,
) -> SourceSettings | None:
    """The settings of a URL list file, when ``urls`` names one (a path or fsspec URL)."""
    if not isinstance(urls, str | os.PathLike):
        return None
    return SourceSettings(
        os.fspath(urls),
        column=column,
        batch_size=batch_size,
        columns=columns,
        storage_options=output.storage_options,
    )


def url_values(
    urls: URLs,
    column: str,
    batch_size: int | Callable[[], int],
    columns: InputColumns = NO_COLUMNS,
    shard_size: int = 0,
) -> tuple[Iterator[UrlBatch], int | None]:
    """The batches of in-memory URLs, lazily, and their count when known up front."""
    values = _url_values(urls, column, columns.names)
    total = len(urls) if isinstance(urls, Sized) and not _is_dask_collection(urls) else None
    rows = ((_string(url), columns.carry(extra)) for url, extra in values)
    return batched(classify(rows), batch_size, shard_size), total


def _url_values(urls: Any, column: str, names: tuple[str, ...]) -> Iterable[tuple[Any, tuple]]:
    """(URL, values of ``names``) of each input line."""
    if _is_dask_collection(urls):
        return _dask_partitions(_columns(urls, column, names))
    if hasattr(urls, "columns") or hasattr(urls, "to_numpy"):  # pandas DataFrame / Series
        return _rows(_columns(urls, column, names))
    if isinstance(urls, bytes | Mapping) or not isinstance(urls, Iterable):
        raise ValueError(
            "urls must be a path, an iterable of URL strings, or a pandas/dask DataFrame; "
            f"got {type(urls).__name__}"
        )
    _no_columns(names, "an iterable of URLs")
    return ((url, ()) for url in urls)


def _no_columns(names: tuple[str, ...], what: str) -> None:
    if names:
        raise ValueError(f"{what} has no columns: {list(names)} need a DataFrame or a list file")


def _columns(frame: Any, column: str, names: tuple[str, ...]) -> Any:
    """The URL column, then ``names``: a DataFrame, or the Series itself."""
    if not hasattr(frame, "columns"):
        _no_columns(names, "a Series")
        return frame
    for name in (column, *names):
        if name not in frame.columns:
            raise ValueError(f"column {name!r} not in the DataFrame's {list(frame.columns)}")
    return frame[list(dict.fromkeys((column, *names)))], (column, *names)


def _rows(selected: Any) -> list[tuple[Any, tuple]]:
    if not isinstance(selected, tuple):  # a Series
        return [(url, ()) for url in selected.tolist()]
    frame, (column, *names) = selected
    urls = frame[column].tolist()
    if not names:
        return [(url, ()) for url in urls]
    return list(zip(urls, zip(*(frame[n].tolist() for n in names), strict=True), strict=True))


def _kept(
    urls: URLs, listing: SourceSettings | None, columns: InputColumns, remote: bool
) -> tuple[tuple[str, str], ...]:
    """The kept columns' kinds; a list the workers read says its own (``WorkerInput``)."""
    if listing is None:
        return _frame_kinds(urls, columns)
    return tuple((n, "string") for n in columns.keep) if remote else kept_kinds(listing)


def _worker_input(selected: Any, columns: InputColumns, batch_size: int) -> WorkerInput:
    if isinstance(selected, SourceSettings):
        return WorkerInput(listing=selected)
    frame, names = selected if isinstance(selected, tuple) else (selected, None)
    return WorkerInput(frame=frame, names=names, columns=columns, batch_size=batch_size)


def _frame_kinds(urls: Any, columns: InputColumns) -> tuple[tuple[str, str], ...]:
    """(name, kind) of the kept columns of a DataFrame, from its dtypes."""
    if not columns.keep:
        return ()
    dtypes = urls[list(columns.keep)].dtypes if hasattr(urls, "columns") else {}
    return tuple((name, dtype_kind(dtypes.get(name))) for name in columns.keep)


def _names(keep: Iterable[str]) -> tuple[str, ...]:
    if isinstance(keep, str):  # "a,b,c", as on the command line
        keep = keep.split(",")
    return tuple(name.strip() for name in keep if name.strip())


def _is_dask_collection(value: Any) -> bool:
    return hasattr(value, "npartitions") and hasattr(value, "to_delayed")


def _dask_partitions(selected: Any) -> Iterator[tuple[Any, tuple]]:
    """One partition at a time: computed where the collection lives (the default client's
    cluster), so only one partition of URLs is ever on the client."""
    frame, names = selected if isinstance(selected, tuple) else (selected, None)
    for part in frame.to_delayed():
        yield from _rows((part.compute(), names) if names else part.compute())


def _string(value: Any) -> str:
    # A missing value (None, NaN) is an input line too: an empty URL, so an invalid_url row.
    return value.strip() if isinstance(value, str) else ""


def _thumb_settings(
    thumb: ThumbSettings | None,
    size: tuple[int, int] | None,
    mode: str | None,
    format: str | None,
    quality: int | None,
) -> ThumbSettings:
    given = {
        k: v
        for k, v in {"size": size, "mode": mode, "format": format, "quality": quality}.items()
        if v is not None
    }
    if thumb is not None:
        if given:
            raise ValueError(f"give thumb= or {', '.join(given)}, not both")
        return thumb
    return ThumbSettings(**given)


def _output_settings(
    out: str | os.PathLike[str] | OutputSettings, storage_options: Mapping[str, Any] | None
) -> OutputSettings:
    if isinstance(out, OutputSettings):
        return replace(out, storage_options=dict(storage_options)) if storage_options else out
    return OutputSettings(os.fspath(out), dict(storage_options or {}))


def _cluster_settings(
    cluster: clusters.ClusterSettings | str | None,
) -> clusters.ClusterSettings | None:
    if cluster is None or isinstance(cluster, clusters.ClusterSettings):
        return cluster
    return clusters.ClusterSettings(kind=cluster)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value
