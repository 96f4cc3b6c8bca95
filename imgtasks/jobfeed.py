"""What the live job page shows, gathered on the client from the batch reports it already
receives: no work on the workers, no extra round trips.

:class:`JobFeed` is fed one :class:`~imgtasks.nodes.BatchReport` at a time by the flow (in
the thread that runs the job) and read by the page (on a web server's event loop), so it
keeps its figures behind a lock and hands out frozen :class:`JobFigures`. Adding a report
is a few dict updates (measured: ~10 us); everything costlier (reading manifest parts and
thumbnails for the grid) happens only when a page asks, and never on the event loop.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from imgtasks.contact_sheet import SHOWN_WITH_IMAGE, Tile, output_reader
from imgtasks.manifest import covering_part, read_part
from imgtasks.nodes import BatchReport
from imgtasks.sinks import OutputSettings

TOP = 10  # hosts and errors listed
RECENT_TILES = 24  # thumbnails in the grid
SAMPLES = 3600  # points kept of the rate series (one per finished batch; older ones thinned)
RATE_WINDOW_S = 5.0  # images/s and MB/s: over the batches of the last few seconds
_CACHE = 256  # thumbnails kept in memory by path
HOST_SERIES = 8  # hosts whose concurrency limit is charted: the highest limits seen
HOST_POINTS = 600  # points kept per host (one per batch that fetched from it)


@dataclass(frozen=True)
class Rate:
    """One point of the rate series: seconds since the start, images/s, MB/s."""

    t: float
    images_per_s: float
    mb_per_s: float


@dataclass(frozen=True)
class HostPoint:
    """One point of a host's concurrency series: seconds since the start, the adaptive
    limit of the I/O process that reported it, and its requests in flight then."""

    t: float
    limit: float
    in_flight: int


@dataclass(frozen=True)
class JobFigures:
    """A consistent snapshot of the job so far: what the page and :class:`Result` show."""

    run_id: str = ""
    done: int = 0  # input lines handled
    total: int | None = None  # input lines, when known up front
    counts: Mapping[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    elapsed_s: float = 0.0
    rates: tuple[Rate, ...] = ()
    failed_hosts: Mapping[str, int] = field(default_factory=dict)  # top TOP
    errors: Mapping[str, int] = field(default_factory=dict)  # top TOP failing statuses/errors
    host_limits: Mapping[str, tuple[HostPoint, ...]] = field(default_factory=dict)
    finished: bool = False
    version: int = 0  # grows with every report: a page redraws only when it changed

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, self.done / self.total)

    @property
    def ok(self) -> int:
        return self.counts.get("ok", 0)

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.counts.items() if status not in SHOWN_WITH_IMAGE)


class JobFeed:
    """The client's running figures of one job, safe to read from another thread."""

    def __init__(
        self,
        output: OutputSettings | None = None,
        run_id: str = "",
        total: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.output = output
        self.clock = clock
        self._lock = threading.Lock()
        self._tiles_lock = threading.Lock()
        self._started = clock()
        self._figures = JobFigures(run_id=run_id, total=total)
        self._done = self._bytes = self._version = 0
        self._elapsed = 0.0
        self._finished = False
        self._counts: Counter = Counter()
        self._hosts = TopCounts()
        self._errors = TopCounts()  # network errors name their host: as many as the hosts
        self._rates: deque[Rate] = deque(maxlen=SAMPLES)
        self._host_series: dict[str, deque[HostPoint]] = {}
        self._host_peaks: dict[str, float] = {}  # the highest limit of each charted host
        self._window: deque[tuple[float, int, int]] = deque()  # (t, entries, bytes) per batch
        self._parts: deque[str] = deque(maxlen=RECENT_TILES)  # newest manifest parts last
        self._thumbs: OrderedDict[str, bytes | None] = OrderedDict()
        self._read = output_reader(output) if output is not None else None

    def start(self) -> None:
        """The clock of the rate series starts now (the cluster is up)."""
        with self._lock:
            self._started = self.clock()

    def add(self, report: BatchReport) -> None:
        """One finished batch (called by the flow for every report): counters only; the
        top-ten lists are made when a page asks (a crawl can fail on 100,000 hosts)."""
        now = self.clock() - self._started
        with self._lock:
            self._counts.update(report.counts)
            self._hosts.update(report.failed_hosts)
            self._errors.update(failure_kinds(report))
            self._window.append((now, report.entries, report.bytes_in))
            while len(self._window) > 1 and now - self._window[0][0] > RATE_WINDOW_S:
                self._window.popleft()
            self._rates.append(_rate(self._window, now))
            for host, (limit, in_flight) in report.host_limits.items():
                self._add_host_point(host, HostPoint(now, limit, in_flight))
            if report.manifest_path:
                self._parts.append(report.manifest_path)
            self._done += report.entries
            self._bytes += report.bytes_in
            self._elapsed = now
            self._version += 1

    def _add_host_point(self, host: str, point: HostPoint) -> None:
        """Keep the series of the HOST_SERIES hosts with the highest limits: a new host
        takes the place of the one whose peak is lowest, if its limit is higher."""
        series = self._host_series.get(host)
        if series is None:
            if len(self._host_series) >= HOST_SERIES:
                # a crawl meets new hosts in every report: the peaks are kept, not recounted
                lowest = min(self._host_peaks, key=self._host_peaks.__getitem__)
                if self._host_peaks[lowest] >= point.limit:
                    return
                del self._host_series[lowest], self._host_peaks[lowest]
            series = self._host_series[host] = deque(maxlen=HOST_POINTS)
        series.append(point)
        self._host_peaks[host] = max(self._host_peaks.get(host, 0.0), point.limit)

    def finish(self) -> None:
        with self._lock:
            self._finished = True
            self._version += 1

    def figures(self) -> JobFigures:
        """The snapshot, with the clock brought up to now (made again only after a report)."""
        with self._lock:
            if self._figures.version != self._version:
                self._figures = JobFigures(
                    run_id=self._figures.run_id,
                    done=self._done,
                    total=self._figures.total,
                    counts=dict(self._counts),
                    bytes_in=self._bytes,
                    elapsed_s=self._elapsed,
                    rates=tuple(self._rates),
                    failed_hosts=dict(self._hosts.most_common(TOP)),
                    errors=dict(self._errors.most_common(TOP)),
                    host_limits={h: tuple(s) for h, s in self._host_series.items()},
                    finished=self._finished,
                    version=self._version,
                )
            figures = self._figures
            elapsed = figures.elapsed_s if figures.finished else self.clock() - self._started
        return replace(figures, elapsed_s=elapsed)

    def recent_tiles(self, limit: int = RECENT_TILES) -> list[Tile]:
        """The newest rows' tiles, newest first: thumbnails for ``ok`` rows, failures as
        status-only tiles. Reads the newest manifest parts (index, status, path) and the
        thumbnails not read before; blocking I/O, so call it off any event loop."""
        if self.output is None or self._read is None:
            return []
        with self._lock:
            parts = list(self._parts)
        with self._tiles_lock:  # two pages open: one reads at a time, through one cache
            return self._tiles(parts, limit)

    def _tiles(self, parts: list[str], limit: int) -> list[Tile]:
        assert self.output is not None
        tiles: list[Tile] = []
        read: set[str] = set()
        for part in reversed(parts):
            rows = self._part_rows(part, read)
            for row in sorted(rows, key=lambda r: -int(r["index"])):
                status, path = str(row["status"]), str(row["path"] or "")
                image = self._thumbnail(path) if path and status in SHOWN_WITH_IMAGE else None
                tiles.append(Tile(int(row["index"]), status, image))
                if len(tiles) >= limit:
                    return tiles
        return tiles

    def _part_rows(self, part: str, read: set[str]) -> list[dict]:
        """A batch part's rows; once compacted, those of the part holding it (read once)."""
        assert self.output is not None
        columns = ["index", "status", "path"]
        with contextlib.suppress(Exception):  # compacted meanwhile
            return read_part(self.output, part, columns).to_pylist()
        holder = covering_part(self.output, part)
        if holder is None or holder in read:
            return []
        read.add(holder)
        with contextlib.suppress(Exception):  # replaced or removed meanwhile: skip it
            return read_part(self.output, holder, columns).to_pylist()
        return []

    def _thumbnail(self, path: str) -> bytes | None:
        if path in self._thumbs:
            self._thumbs.move_to_end(path)
            return self._thumbs[path]
        assert self._read is not None
        try:
            data = self._read(path)
        except Exception:
            data = None
        self._thumbs[path] = data
        while len(self._thumbs) > _CACHE:
            self._thumbs.popitem(last=False)
        return data


class TopCounts:
    """Counts by key, kept for the largest: past 2 x KEEP keys, all but the KEEP largest are
    dropped. A crawl fails on new hosts in nearly every batch: a Counter of every failing
    host grew ~100 bytes a host for the whole run (hundreds of thousands of hosts at
    LAION's scale), and its ``most_common(TOP)``, made for each new figure, scanned them
    all. The TOP shown are exact unless one of them was dropped early, below the KEEP-th
    count: then only its failures since are counted."""

    KEEP = 10_000

    def __init__(self) -> None:
        self._counts: Counter = Counter()

    def __len__(self) -> int:
        return len(self._counts)

    def update(self, counts: Mapping[str, int]) -> None:
        self._counts.update(counts)
        if len(self._counts) > 2 * self.KEEP:  # amortised: once per KEEP new keys
            self._counts = Counter(dict(self._counts.most_common(self.KEEP)))

    def most_common(self, n: int) -> list[tuple[str, int]]:
        return self._counts.most_common(n)


def failure_kinds(report: BatchReport) -> Counter:
    """A report's failures by kind: network failures by their error (``timeout: ...``),
    every other failure by its status."""
    kinds: Counter = Counter(report.network_errors)
    network = Counter()
    for kind, n in report.network_errors.items():
        network[kind.split(":", 1)[0]] += n
    for status, n in report.counts.items():
        rest = n - network.get(status, 0)
        if status not in SHOWN_WITH_IMAGE and rest > 0:
            kinds[status] += rest
    return kinds


def _rate(window: deque[tuple[float, int, int]], now: float) -> Rate:
    span = max(now - window[0][0], 1e-3) if len(window) > 1 else max(now, 1e-3)
    # the oldest batch of the window finished at its start: count what came after it
    entries = sum(e for _, e, _ in window) - (window[0][1] if len(window) > 1 else 0)
    nbytes = sum(b for _, _, b in window) - (window[0][2] if len(window) > 1 else 0)
    return Rate(now, entries / span, nbytes / span / 1e6)
