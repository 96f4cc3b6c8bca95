"""Orchestration of the input read by the workers (``read_on="workers"``).

The client submits one plan node (a list's partitions, from its size or Parquet footer),
then one read node per partition, a few ahead of the batches going out; from each
partition it hears only its size (batches, lines). Each batch then goes out as a
:class:`~imgtasks.partitions.PartBatch` through the same window as the client's batches
(``flow.stream_batches``): its download node takes it from the partition on the worker
that read it, and feeds the usual thumbnail node. As many partitions as there are I/O
workers send batches at once, in turn, so every I/O worker downloads. The plain
functions are in :mod:`imgtasks.partitions`.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import dask
from distributed import Client, Future

from imgtasks import cluster as clusters
from imgtasks import partitions
from imgtasks.flow import RETRIES, Wiring
from imgtasks.manifest import Record
from imgtasks.partitions import (
    BatchPlace,
    ListPart,
    PartBatch,
    is_glob,
    partition_size,
    plan_list,
    read_frame_part,
    read_list_part,
)
from imgtasks.sources import DEFAULT_BATCH_SIZE, NO_COLUMNS, InputColumns, SourceSettings

log = logging.getLogger(__name__)

# Partitions read ahead of those whose batches are going out: the next is ready when one
# runs out, and at most this many wait on the workers besides those with batches in
# flight (each ~15 MB: see partitions.PART_ROWS).
READ_AHEAD = 2


@dataclass(frozen=True)
class WorkerInput:
    """An input the workers read: a URL list file, or a dask DataFrame (its URL column
    first, then ``names``' others) or Series."""

    listing: SourceSettings | None = None
    frame: Any = None
    names: tuple[str, ...] | None = None  # the frame's columns; None: a Series
    columns: InputColumns = NO_COLUMNS
    batch_size: int = DEFAULT_BATCH_SIZE

    def start(self, client: Client, wiring: Wiring) -> tuple[Wiring, Iterator[PartBatch]]:
        """Plan the partitions on a worker; the wiring with the list's kept column kinds,
        and the batches, lazily (each partition read when its turn comes)."""
        done = _shared(client, wiring.done)
        readers = Readers(client, wiring.route)
        active = len(readers.addresses()) or 1
        if self.listing is None:
            reads = self._frame_reads(client, wiring.token, done, readers)
            return wiring, part_batches(client, reads, active)
        plan = client.submit(
            plan_list,
            self.listing,
            partitions.BLOCK_SIZE,  # read here, at run time: a test makes them small
            partitions.PART_ROWS,
            key=f"plan-{wiring.token}",
            resources=readers.resources,
            pure=False,
        ).result()
        log.debug("%s: %d partitions", self.listing.path, len(plan.parts))
        reads = self._list_reads(plan.parts, wiring.token, done, readers)
        batches = part_batches(client, reads, active)
        return replace(wiring, job=replace(wiring.job, kept=plan.kept)), batches

    def _list_reads(
        self, parts: Iterable[ListPart], token: str, done: Any, readers: Readers
    ) -> Iterator[Future]:
        """Each partition of the list read on its download worker, as its turn comes."""
        for part in parts:
            yield readers.client.submit(
                read_list_part,
                part,
                self.listing,
                done,
                key=f"read-{token}-{part.number}",
                resources=readers.resources,
                retries=RETRIES,
                pure=False,
                **readers.place(part.number),
            )

    def _frame_reads(
        self, client: Client, token: str, done: Any, readers: Readers
    ) -> Iterator[Future]:
        """Each partition computed on the cluster and batched where it was computed."""
        for number, part in enumerate(self.frame.to_delayed()):
            read = dask.delayed(read_frame_part, pure=False)(
                part,
                self.names,
                self.columns,
                self.batch_size,
                done,
                dask_key_name=f"read-{token}-{number}",
            )
            yield client.compute(read, retries=RETRIES, **readers.place(number))


def _shared(client: Client, done: Mapping[str, Record]) -> Any:
    """resume: the finished URLs' rows, sent to the cluster once (not with every read)."""
    if not done:
        return {}
    return client.scatter([dict(done)], hash=False)[0]


@dataclass
class _Open:
    """A partition whose batches are going out: its place in the input, the next batch."""

    part: Future
    offset: int
    batches: int
    next: int = 0


def part_batches(client: Client, reads: Iterator[Future], active: int = 1) -> Iterator[PartBatch]:
    """The batches of ``active`` partitions at once, one from each in turn, each placed after
    the lines of the partitions before it; ``READ_AHEAD`` more partitions read meanwhile.

    Dask runs a task where its data is (``decide_worker``): a partition's download nodes
    all run on the worker that read it. One partition at a time would keep one I/O worker
    downloading; ``active`` = the I/O workers keeps them all busy."""
    waiting: deque[tuple[Future, Future]] = deque()  # read or being read, not yet open
    going: deque[_Open] = deque()

    def read_ahead() -> None:
        for part in itertools.islice(reads, active + READ_AHEAD - len(waiting) - len(going)):
            size = client.submit(partition_size, part, key=f"size-{part.key}", pure=False)
            waiting.append((part, size))

    offset = batch_id = 0
    try:
        read_ahead()
        while going or waiting:
            while len(going) < active and waiting:  # partitions open in input order
                part, size = waiting.popleft()
                batches, lines = size.result()
                going.append(_Open(part, offset, batches))
                offset += lines
                read_ahead()
            current = going.popleft()
            if current.next < current.batches:
                yield PartBatch(current.part, BatchPlace(current.next, current.offset, batch_id))
                batch_id += 1
                current.next += 1
            if current.next < current.batches:
                going.append(current)
    finally:  # interrupted: the partitions read ahead go too
        if waiting:
            client.cancel([f for pair in waiting for f in pair], force=True)


@dataclass(frozen=True)
class Readers:
    """Where partitions are read: the download workers in turn (partition n on the n-th,
    modulo their number), so the partitions going out at once are on different workers.
    Asked per partition: workers that joined since are used too."""

    client: Client
    route: bool

    @property
    def resources(self) -> dict[str, int] | None:
        return {clusters.IO_RESOURCE: 1} if self.route else None

    def addresses(self) -> list[str]:
        """The workers that run download nodes: with an ``io`` resource when routed."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        io = [a for a, w in workers.items() if (w.get("resources") or {}).get(clusters.IO_RESOURCE)]
        return sorted(io if self.route else workers)

    def place(self, number: int) -> dict[str, Any]:
        """``submit``/``compute`` keywords: that worker if it is there, else any."""
        addresses = self.addresses()
        if not addresses:
            return {}
        return {"workers": [addresses[number % len(addresses)]], "allow_other_workers": True}


READ_ON = ("auto", "client", "workers")


def reads_on_workers(
    read_on: str, urls: Any, listing: SourceSettings | None, sync: bool, sharded: bool
) -> bool:
    """Whether the workers read ``urls``: asked for, or (``"auto"``) a dask collection on
    a distributed cluster. ValueError where they cannot."""
    if read_on not in READ_ON:
        raise ValueError(f"read_on must be one of {READ_ON}, got {read_on!r}")
    frame = is_dask_collection(urls)
    several = listing is not None and is_glob(listing.path)
    if several and read_on != "workers":
        raise ValueError(f"{listing.path}: a glob of URL lists is read by the workers only")
    if read_on == "auto":
        return frame and not sync and not sharded
    if read_on == "client":
        return False
    if listing is None and not frame:
        raise ValueError("read_on='workers' reads a URL list path or a dask DataFrame")
    if sync:
        raise ValueError("read_on='workers' needs a distributed cluster, not 'sync'")
    if sharded:
        raise ValueError("read_on='workers' writes output_format='files' only")
    return True


def is_dask_collection(value: Any) -> bool:
    return hasattr(value, "npartitions") and hasattr(value, "to_delayed")
