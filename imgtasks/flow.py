"""Orchestration: the Dask graph of each batch, the bounded window, the tally.

For each batch of URLs one download node feeds one thumbnail node (``dask.delayed`` over
the plain functions of :mod:`imgtasks.nodes`). With an I/O pool and a CPU pool in the
cluster the nodes are routed to them by resources. Batches go out through a window of a
few dozen at a time, so memory stays flat however long the URL list is: Dask's own
queuing does not hold back tasks with resource restrictions (see ``shared/notes/dask.md``).

With :mod:`imgtasks.cluster`, the only module that imports dask.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import dask
from dask.delayed import Delayed
from distributed import Client, Future, as_completed
from distributed.protocol.pickle import dumps

from imgtasks import cluster as clusters
from imgtasks.download import DownloadSettings
from imgtasks.keycache import KeyCacheClearing
from imgtasks.manifest import Record, Rollup, compact_parts
from imgtasks.nodes import (
    BatchReport,
    JobSettings,
    ShardedBatch,
    call_packed,
    download_batch,
    failed_piece,
    record_failed_batch,
    report_of,
    resume_batch,
    shard_node,
    thumbnail_batch,
    thumbnail_piece,
)
from imgtasks.partitions import (
    PartBatch,
    download_part_batch,
    failed_part_batch,
    thumbnail_part_batch,
)
from imgtasks.runlog import BatchLog
from imgtasks.sources import UrlBatch
from imgtasks.status import NOT_FETCHED, Status
from imgtasks.taskthreads import renewing
from imgtasks.window import BatchSizing, Finished, Window

log = logging.getLogger(__name__)

RETRIES = 2  # Dask's, for infrastructure faults (a lost worker); HTTP retries live in download


def new_run_id() -> str:
    """UTC to the microsecond: manifest parts sort by run, and the latest row of a URL wins."""
    now = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9))
    return f"{stamp}.{now // 1000 % 10**6:06d}Z-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Wiring:
    """What every batch's graph shares."""

    download: DownloadSettings
    job: JobSettings
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # unique task keys
    route: bool = False  # send stages to the io/cpu pools by resources
    done: Mapping[str, Record] = field(default_factory=dict, hash=False)  # --resume

    def graph(self, batch: UrlBatch | PartBatch) -> Delayed:
        """One download node feeding one thumbnail node; keys named after the stage.

        The batch and settings go in pickled once, here, bound to ``call_packed`` (see
        ``packed``)."""
        if isinstance(batch, PartBatch):
            return self.part_graph(batch)
        batch, previous = resume_batch(batch, self.done)
        with _annotate(self.route, clusters.IO_RESOURCE):
            downloaded = dask.delayed(
                packed(renewing, download_batch, batch, self.download), pure=False
            )(dask_key_name=f"download-{self.token}-{batch.batch_id}")
        with _annotate(self.route, clusters.CPU_RESOURCE):
            thumbnail = packed(thumbnail_batch, job=self.job, previous=previous or None)
            return dask.delayed(thumbnail, pure=False)(
                downloaded, dask_key_name=f"thumbnail-{self.token}-{batch.batch_id}"
            )

    def part_graph(self, batch: PartBatch) -> Delayed:
        """A batch read by the workers: its download node takes it from its partition."""
        with _annotate(self.route, clusters.IO_RESOURCE):
            downloaded = dask.delayed(renewing, pure=False)(
                download_part_batch,
                batch.part,
                batch.place,
                self.download,
                dask_key_name=f"download-{self.token}-{batch.batch_id}",
            )
        with _annotate(self.route, clusters.CPU_RESOURCE):
            return dask.delayed(thumbnail_part_batch, pure=False)(
                downloaded, self.job, dask_key_name=f"thumbnail-{self.token}-{batch.batch_id}"
            )

    def piece_graph(self, batch: UrlBatch) -> tuple[Delayed, Delayed]:
        """Shard mode: a download node feeding a thumbnail node that holds its thumbnails
        for the shard writer, and the small report the client reads from it."""
        with _annotate(self.route, clusters.IO_RESOURCE):
            downloaded = dask.delayed(
                packed(renewing, download_batch, batch, self.download), pure=False
            )(dask_key_name=f"download-{self.token}-{batch.batch_id}")
        with _annotate(self.route, clusters.CPU_RESOURCE):
            piece = dask.delayed(packed(thumbnail_piece, job=self.job), pure=False)(
                downloaded, dask_key_name=f"thumbnail-{self.token}-{batch.batch_id}"
            )
            report = dask.delayed(report_of, pure=True)(
                piece, dask_key_name=f"report-{self.token}-{batch.batch_id}"
            )
        return piece, report

    def shard_of(self, batch: UrlBatch) -> int:
        assert self.job.shards is not None
        return self.job.shards.shard_of(batch.entries[0].index)

    def failed_piece(self, batch: UrlBatch, exc: BaseException) -> ShardedBatch:
        error = f"{type(exc).__name__}: {exc}"
        log.error("batch %d failed: %s", batch.batch_id, error)
        return failed_piece(batch, error, self.job)

    def failed(self, batch: UrlBatch | PartBatch, exc: BaseException) -> BatchReport | None:
        """The client writes the rows of a batch whose node failed on every retry (a
        worker does, for a batch read by the workers: the client has no entries)."""
        error = f"{type(exc).__name__}: {exc}"
        log.error("batch %d failed: %s", batch.batch_id, error)
        try:
            if isinstance(batch, PartBatch):
                args = (batch.part, batch.place, error, self.job)
                return batch.part.client.submit(failed_part_batch, *args, pure=False).result()
            batch, previous = resume_batch(batch, self.done)
            return record_failed_batch(batch, error, self.job, previous)
        except Exception as write_exc:  # the store refuses the client too: nothing left to do
            log.error("batch %d: its rows could not be written: %s", batch.batch_id, write_exc)
            return None


def packed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> partial:
    """``fn`` with its arguments pickled once, here, into one bytes object.

    Bound with ``partial`` rather than passed as arguments, because ``dask.delayed`` walks
    dataclass arguments field by field looking for collections (~60 us per ``UrlEntry``
    on the client). Pickled here rather than left to Dask, because the scheduler unpickles
    every task it is sent and pickles it again for the worker: ~3 us per ``UrlEntry``.
    A bytes object it moves as it is. With this and ``stream_batches``' single refills and
    gathers, a task at batch 1024 went from 3.3-3.8 ms of scheduler CPU to 1.0-1.2
    (``benchmarks/cost_model.py``, interleaved pairs)."""
    return partial(call_packed, dumps((fn, args, kwargs)))


def _annotate(route: bool, resource: str) -> contextlib.AbstractContextManager:
    if not route:
        return dask.annotate(retries=RETRIES)
    return dask.annotate(resources={resource: 1}, retries=RETRIES)


@dataclass
class Tally:
    """What the client has heard back so far."""

    total: int | None = None
    started: float = field(default_factory=time.perf_counter)
    counts: Counter = field(default_factory=Counter)
    entries: int = 0
    download_s: float = 0.0
    thumbnail_s: float = 0.0
    thumbnail_wall_s: float = 0.0  # the thumbnail nodes' wall time: the CPU pool's busy time
    downloaded: int = 0
    resumed: int = 0
    ready: float = 0.0  # seconds until the scheduler was up and the first batch went out
    failed_batches: list[str] = field(default_factory=list)
    storms: StormWatch = field(default_factory=lambda: StormWatch())
    batches: int = 0  # reports heard: batches done (their sizes vary: window.BatchSizing)
    largest_batch: int = 0

    def add(self, report: BatchReport) -> None:
        self.storms.add(report)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, report.entries)
        self.resumed += report.resumed
        self.counts.update(report.counts)
        self.entries += report.entries
        self.download_s += report.download_s
        self.thumbnail_s += report.thumbnail_s
        self.thumbnail_wall_s += report.thumbnail_wall_s
        self.downloaded += fetched(report)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class StormWatch:
    """Says so, once, when most of the last URLs failed on the network (connection errors,
    time-outs): DNS or the machine's network is failing, or hosts are refusing us. It says
    so again only after the storm has passed (failures back under a quarter)."""

    LAST = 200  # URLs looked at
    AT_LEAST = 100  # URLs seen before judging
    STORM = 0.5  # share of network failures that is a storm
    CALM = 0.25

    def __init__(self) -> None:
        self.recent: deque[BatchReport] = deque()
        self.in_storm = False

    def add(self, report: BatchReport) -> None:
        self.recent.append(report)
        while sum(r.entries for r in self.recent) - self.recent[0].entries >= self.LAST:
            self.recent.popleft()
        seen = sum(r.entries for r in self.recent)
        failed = sum(sum(r.network_errors.values()) for r in self.recent)
        share = failed / max(seen, 1)
        if not self.in_storm and seen >= self.AT_LEAST and share >= self.STORM:
            self.in_storm = True
            log.warning(self.describe(failed, seen))
        elif self.in_storm and share < self.CALM:
            self.in_storm = False

    def describe(self, failed: int, seen: int) -> str:
        errors: Counter = Counter()
        hosts: Counter = Counter()
        for report in self.recent:
            errors.update(report.network_errors)
            hosts.update(report.failed_hosts)
        error, _ = errors.most_common(1)[0]
        top = ", ".join(f"{h} ({n})" for h, n in hosts.most_common(5))
        return (
            f"{failed} of the last {seen} URLs failed on the network; most often {error}; "
            f"hosts: {top}. DNS or the network may be failing, or hosts refusing us "
            "(a local caching resolver helps: see the README's crawl advice)"
        )


class Progress:
    """A progress bar (``tqdm.auto``: a terminal line, or a widget in Jupyter), the run
    log's line per finished batch, and whoever else watches the reports (the job page)."""

    def __init__(
        self,
        enabled: bool,
        total: int | None,
        batch_log: BatchLog | None,
        watchers: Iterable[Callable[[BatchReport], None]] = (),
    ) -> None:
        self.batch_log = batch_log
        self.watchers = tuple(watchers)
        self.bar = None
        if enabled:
            self.bar = progress_bar()(total=total, unit="img", smoothing=0.05, dynamic_ncols=True)

    def batch_done(self, report: BatchReport, tally: Tally) -> None:
        if self.batch_log is not None:
            self.batch_log.write(report)
        for watch in self.watchers:
            watch(report)
        if self.bar is not None:
            self.bar.update(report.entries)
            self.bar.set_postfix(ok=tally.counts.get(Status.OK, 0), refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar() -> type:
    """tqdm's widget in Jupyter when ipywidgets is there, else its text bar (tqdm.auto
    would warn "IProgress not found" on every run without ipywidgets)."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm


def stream_batches(
    client: Client,
    batches: Iterable[UrlBatch],
    wiring: Wiring,
    window: int | Window,
    tally: Tally,
    progress: Progress,
    sizing: BatchSizing | None = None,
) -> None:
    """Keep the window's batches in flight (a number, or a :class:`Window` sized by
    measurement); submit the next as each one finishes. In shard mode the batches' pieces
    wait on the workers for their shard's writer (``_Writers``). ``sizing``: the batch
    sizes ``batches`` asks for, told how each finished batch went."""
    sizer = window if isinstance(window, Window) else Window(1, 1, start=window, fixed=window)
    pending = iter(batches)
    futures = as_completed()
    in_flight: dict[str, tuple[Future, UrlBatch, float]] = {}
    writers = _Writers(client, wiring, futures) if wiring.job.shards else None
    rollup = None if wiring.job.shards else _Compaction(client, wiring)
    key_cache = KeyCacheClearing(client)

    def submit(n: int) -> None:
        taken = _take(pending, n)
        if writers is not None:
            submitted = [writers.compute(batch) for batch in taken]
        elif taken:
            # One update-graph message for the lot: the scheduler's cost per message
            # (unpickling it in a thread, then its transitions) is shared by the batches.
            submitted = client.compute([wiring.graph(batch) for batch in taken])
        else:
            submitted = []
        for future, batch in zip(submitted, taken, strict=True):
            in_flight[future.key] = (future, batch, time.monotonic())
            futures.add(future)
        if writers is not None:
            writers.submitted(exhausted=len(taken) < n)

    try:
        submit(sizer.target())
        for done in futures.batches():  # every future finished by now: one refill for all
            if writers is not None:
                done = [f for f in done if not writers.written(f, tally)]
            for future, outcome in zip(done, _outcomes(client, done), strict=True):
                _, batch, sent = in_flight.pop(future.key)
                if isinstance(outcome, BaseException):  # failed on every retry: not data
                    if client.status in ("closing", "closed"):  # the run is over, not the batch
                        raise outcome  # (the api closes its client when a worker did not start)
                    failed = writers.failed if writers else wiring.failed
                    report = failed(batch, outcome)
                    tally.failed_batches.append(str(future.key))
                else:
                    report = outcome
                if writers is not None:
                    writers.batch_done(batch)
                _finished(report, tally, progress)
                if report is not None:
                    seen = finished(report, time.monotonic() - sent)
                    sizer.observe(seen, len(in_flight))
                    if sizing is not None:
                        sizing.observe(seen)
                future.release()
                key_cache.batch_done()
                if rollup is not None:
                    rollup.batch_done(batch.batch_id, report)
            submit(max(0, sizer.target() - len(in_flight)))
        if rollup is not None:
            rollup.finish()
    finally:  # interrupted: on a shared cluster, nothing of ours keeps running
        running = [f for f, _, _ in in_flight.values()] + (writers.held() if writers else [])
        running += rollup.running if rollup is not None else []
        if running:
            client.cancel(running, force=True)


def _outcomes(client: Client, done: list[Future]) -> list[Any]:
    """The results of finished futures, fetched in one gather; a failed one's exception
    in its place."""
    if not done:
        return []
    try:
        return client.gather(done)
    except Exception:  # which one failed, and why: each on its own (rare)
        return [_outcome(future) for future in done]


def _outcome(future: Future) -> Any:
    try:
        return future.result()
    except Exception as exc:
        return exc


class _Compaction:
    """The manifest's roll-up (:mod:`imgtasks.manifest`): as the batches of a span are all
    written, one task compacts their parts (on the I/O pool: it is reads and a write);
    without a client, here. A compaction that fails leaves the batch parts: every row is
    still there, only in more files."""

    def __init__(self, client: Client | None, wiring: Wiring) -> None:
        self.client, self.wiring = client, wiring
        self.rollup = Rollup(wiring.job.output.manifest_part_rows)
        self.running: list[Future] = []

    def batch_done(self, batch_id: int, report: BatchReport | None) -> None:
        if report is not None:  # None: the batch's part could not be written at all
            for span in self.rollup.add(batch_id, report.entries):
                self._start(span)

    def finish(self) -> None:
        """Compact the rest and wait for every compaction: a finished run's manifest is
        the compacted parts alone."""
        for span in self.rollup.finish():
            self._start(span)
        for future in self.running:
            self._check(future)
        self.running.clear()

    def _start(self, span: tuple[int, int]) -> None:
        output, run_id = self.wiring.job.output, self.wiring.job.run_id
        if self.client is None:
            try:
                compact_parts(output, run_id, *span)
            except Exception as exc:
                _not_compacted(exc)
            return
        self.running = [f for f in self.running if not (f.done() and self._check(f))]
        resources = {clusters.IO_RESOURCE: 1} if self.wiring.route else None
        self.running.append(
            self.client.submit(
                compact_parts,
                output,
                run_id,
                *span,
                key=f"manifest-{self.wiring.token}-{span[0]}",
                retries=RETRIES,
                pure=False,
                resources=resources,
            )
        )

    @staticmethod
    def _check(future: Future) -> bool:
        """Log a finished compaction's failure; True (it is done with)."""
        try:
            future.result()
        except Exception as exc:
            _not_compacted(exc)
        future.release()
        return True


def _not_compacted(exc: BaseException) -> None:
    log.warning("manifest parts not compacted (they are kept): %s: %s", type(exc).__name__, exc)


@dataclass
class _Shard:
    """The batches of one shard the client has heard of: their pieces (futures on the
    workers, or a failed batch's rows), and how many are still running."""

    pieces: dict[int, Future | ShardedBatch] = field(default_factory=dict)
    running: int = 0
    closed: bool = False  # no more batches of it will come


class _Writers:
    """Shard mode's third stage: a shard's pieces stay on the workers until all its
    batches are done, then one writer node packs them, and they are released."""

    def __init__(self, client: Client, wiring: Wiring, futures: as_completed) -> None:
        self.client, self.wiring, self.futures = client, wiring, futures
        self.shards: dict[int, _Shard] = {}
        self.writers: dict[str, tuple[Future, int]] = {}

    def compute(self, batch: UrlBatch) -> Future:
        """Submit a batch's graph; returns its report's future, keeps its piece's."""
        piece, report = self.client.compute(list(self.wiring.piece_graph(batch)))
        shard = self.shards.setdefault(self.wiring.shard_of(batch), _Shard())
        for earlier in self.shards.values():
            earlier.closed = earlier is not shard  # batches come in input order
        shard.pieces[batch.batch_id], shard.running = piece, shard.running + 1
        return report

    def failed(self, batch: UrlBatch, exc: BaseException) -> BatchReport:
        """A batch failed every retry: its rows go into its shard all the same."""
        piece = self.wiring.failed_piece(batch, exc)
        self.shards[self.wiring.shard_of(batch)].pieces[batch.batch_id] = piece
        return piece.report

    def batch_done(self, batch: UrlBatch) -> None:
        self.shards[self.wiring.shard_of(batch)].running -= 1
        self.submitted(exhausted=False)

    def submitted(self, exhausted: bool) -> None:
        """Submit the writer of every shard whose batches are all done and will have no more."""
        for shard in self.shards.values() if exhausted else ():
            shard.closed = True
        ready = [s for s, shard in self.shards.items() if shard.closed and not shard.running]
        for shard_id in ready:
            pieces = list(self.shards.pop(shard_id).pieces.values())
            writer = self.client.submit(
                shard_node,
                shard_id,
                pieces,
                self.wiring.job,
                key=f"shard-{self.wiring.token}-{shard_id}",
                retries=RETRIES,
                pure=False,
                resources={clusters.IO_RESOURCE: 1} if self.wiring.route else None,
            )
            self.writers[writer.key] = (writer, shard_id)
            self.futures.add(writer)

    def written(self, future: Future, tally: Tally) -> bool:
        """Whether ``future`` is a writer's (then done with: its shard is written or not)."""
        if future.key not in self.writers:
            return False
        _, shard_id = self.writers.pop(future.key)
        try:
            stats = future.result()
        except Exception as exc:  # the shard stays absent: --resume writes it again
            log.error("shard %05d failed: %s: %s", shard_id, type(exc).__name__, exc)
            tally.failed_batches.append(f"shard-{shard_id:05d}")
        else:
            log.debug("shard %05d written: %s", shard_id, stats.get("counts"))
        future.release()
        return True

    def held(self) -> list[Future]:
        """What is still on the cluster: held pieces and running writers."""
        pieces = [p for shard in self.shards.values() for p in shard.pieces.values()]
        return [p for p in pieces if isinstance(p, Future)] + [f for f, _ in self.writers.values()]


def run_sync_shards(
    batches: Iterable[UrlBatch], wiring: Wiring, tally: Tally, progress: Progress
) -> None:
    """Shard mode with Dask's synchronous scheduler, shard after shard in this thread."""
    for shard_id, shard_batches in itertools.groupby(batches, wiring.shard_of):
        pieces = []
        for batch in shard_batches:
            try:
                (piece,) = dask.compute(wiring.piece_graph(batch)[0], scheduler="sync")
            except Exception as exc:
                piece = wiring.failed_piece(batch, exc)
                tally.failed_batches.append(f"batch-{batch.batch_id}")
            _finished(piece.report, tally, progress)
            pieces.append(piece)
        shard_node(shard_id, pieces, wiring.job)


def run_sync(batches: Iterable[UrlBatch], wiring: Wiring, tally: Tally, progress: Progress) -> None:
    """Dask's synchronous scheduler, batch after batch in this thread (for debugging)."""
    rollup = _Compaction(None, wiring)
    for batch in batches:
        try:
            (report,) = dask.compute(wiring.graph(batch), scheduler="sync")
        except Exception as exc:
            report = wiring.failed(batch, exc)
            tally.failed_batches.append(f"batch-{batch.batch_id}")
        _finished(report, tally, progress)
        rollup.batch_done(batch.batch_id, report)
    rollup.finish()


def _finished(report: BatchReport | None, tally: Tally, progress: Progress) -> None:
    if report is not None:
        tally.add(report)
        progress.batch_done(report, tally)


def _take(items: Iterator[UrlBatch], n: int) -> list[UrlBatch]:
    return list(itertools.islice(items, n))


def fetched(report: BatchReport) -> int:
    """URLs the batch downloaded (not resumed, not invalid or repeated)."""
    return sum(n for s, n in report.counts.items() if s not in NOT_FETCHED) - report.resumed


def finished(report: BatchReport, turnaround_s: float) -> Finished:
    return Finished(
        entries=report.entries,
        fetched=fetched(report),
        download_s=report.download_s,
        download_wall_s=report.download_wall_s,
        thumbnail_wall_s=report.thumbnail_wall_s,
        thumbnail_cpu_s=report.thumbnail_cpu_s,
        bytes_in=report.bytes_in,
        turnaround_s=turnaround_s,
    )


def measured_window(
    client: Client, max_bytes: int | None = None, slots: tuple[int, int] | None = None
) -> Window:
    """The window sized by measurement on this cluster (the default; ``--window N`` fixes it).
    ``slots``: (CPU slots, I/O slots) when known without asking the workers (a local
    cluster whose workers are still joining: ``Joining.slots``)."""
    cpu, io = slots or clusters.worker_slots(client)
    options = {} if max_bytes is None else {"max_bytes": max_bytes}
    # Without an I/O pool, the download nodes share the CPU slots.
    return Window(cpu, io or cpu, default_window(cpu), **options)


def default_window(cpu_slots: int) -> int:
    """Enough batches in flight to keep every CPU slot busy, and not many more."""
    # Measured on 2 cores, 1000 demo images at 100 ms latency: a window of 6 batches left
    # the CPU workers waiting on downloads (24 images/s), 16 kept them busy (52 images/s),
    # 32 gained nothing more. Each CPU slot needs ~4 batches: its own, and three downloading.
    return max(8, 4 * min(cpu_slots, 512) + 8)
