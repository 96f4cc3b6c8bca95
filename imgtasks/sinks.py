"""Sinks: thumbnails and other output files, on a local directory or any fsspec URL.

Layout under the output root::

    ab/abcd...(sha256 of the URL).jpg        thumbnails, fanned out over 256 directories
    manifest/...                             see imgtasks.manifest

File names come from a hash of the URL only, never from its path or query, so no URL can
name a file outside the output. Every file appears atomically: local files are written to
a temporary name in the same directory and renamed; object stores (s3, gcs, ...) publish
an object only when its single PUT completes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"  # write_atomic's temporaries; a killed writer leaves them behind
STALE_TEMP_AGE = 120.0  # seconds: older temporaries belong to no live write
# 256 directories: ~39k files each at 10M thumbnails. Two levels (65,536) made a run of a
# few thousand images create a directory for nearly every file: 3000 files cost 0.25-0.89
# ms of CPU each instead of 0.15-0.20 (4 interleaved rounds, ext4). Beyond ~10M images,
# shards (--output-format webdataset/parquet) are the layout that scales, as img2dataset's.
FANOUT_LEVELS = 1
# Rows per compacted manifest part (imgtasks.manifest): img2dataset's shard size. Measured
# (benchmarks/manifest_bench.py): 1M rows make 100 parts, 96 MB, read by pandas in 2.2 CPU s,
# where a part per batch of 16 made 62,500 parts, 512 MB.
MANIFEST_PART_ROWS = 10_000


@dataclass(frozen=True)
class OutputSettings:
    """Where outputs go. ``root`` is a local path or an fsspec URL (``s3://bucket/run``)."""

    root: str = "thumbnails"
    storage_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    manifest_part_rows: int = MANIFEST_PART_ROWS  # batches' parts rolled up at this many rows

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("the output location must not be empty")
        if self.manifest_part_rows < 1:
            raise ValueError(f"manifest_part_rows must be >= 1, got {self.manifest_part_rows}")


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


def output_relpath(url: str, ext: str) -> str:
    """Stable, fanned-out file name for a URL: ``ab/<sha256>.<ext>``."""
    key = url_key(url)
    parts = [key[2 * i : 2 * i + 2] for i in range(FANOUT_LEVELS)]
    return "/".join([*parts, f"{key}.{ext}"])


@functools.lru_cache(maxsize=8)
def _filesystem(
    root: str, options: tuple[tuple[str, Any], ...]
) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(root, **dict(options))
    return fs, path.rstrip("/")


def filesystem(settings: OutputSettings) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the root path in it (cached per process)."""
    return _filesystem(settings.root, tuple(sorted(settings.storage_options.items())))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file."""
    if not is_local(fs):
        fs.pipe_file(path, data)  # object stores publish on PUT completion
        return
    fd, tmp = _open_temporary(os.path.dirname(path))
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)  # atomic on POSIX; an interrupted write leaves only .tmp-*
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# A thumbnail file used to cost ~0.13 ms of CPU with makedirs + mkstemp + fdopen, 0.06 ms
# with a known directory, a counter-named temporary and bare os.write (3000 files, ext4).
_made_dirs: set[str] = set()  # directories this process made or found
# Forgotten all at once past this many: a long run writes into ever new directories, and
# the set grew with them (a CPU worker's largest Python allocation after 40k thumbnails,
# ~2.5 MiB and ~23k strings). Forgetting costs one makedirs per directory met again.
MAX_KNOWN_DIRS = 1024
_temp_names = itertools.count()
_TEMP_TOKEN = secrets.token_hex(4)  # with the pid: no two processes pick the same names
# Which machine wrote a temporary: a sweep may then remove at once those whose writer
# process is gone from this machine, whatever their age (a run killed a moment ago).
_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _open_temporary(directory: str) -> tuple[int, str]:
    """A new temporary file in ``directory`` (made if need be), open for writing."""
    for _ in range(100):
        if directory not in _made_dirs:
            os.makedirs(directory, exist_ok=True)
            if len(_made_dirs) >= MAX_KNOWN_DIRS:
                _made_dirs.clear()
            _made_dirs.add(directory)
        name = f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-{_TEMP_TOKEN}-{next(_temp_names)}"
        tmp = f"{directory}/{name}"
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o600), tmp
        except FileExistsError:  # another writer's name: take the next
            continue
        except FileNotFoundError:  # the directory went away since: make it again
            _made_dirs.discard(directory)
    raise FileExistsError(f"no free temporary name in {directory}")


_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def sweep_temporaries(settings: OutputSettings, now: float | None = None) -> int:
    """Delete the temporaries a killed run left in a local output; returns how many.

    Those of a writer process that is gone from this machine go at once; others only when
    older than ``STALE_TEMP_AGE``, so a writer still running into the same output (here
    or on another host sharing it) keeps its in-flight files. Object stores have no
    temporaries.
    """
    fs, root = filesystem(settings)
    if not is_local(fs) or not os.path.isdir(root):
        return 0
    cutoff = (time.time() if now is None else now) - STALE_TEMP_AGE
    removed = 0
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if name.startswith(TEMP_PREFIX) and (_writer_gone(name) or _modified(path) < cutoff):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed += 1
    return removed


def _writer_gone(name: str) -> bool:
    """Whether a temporary's name says it was written on this machine by a process that
    no longer runs (a reused pid only keeps it until it is stale)."""
    host, _, rest = name[len(TEMP_PREFIX) :].partition("-")
    pid = rest.partition("-")[0]
    if host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs, as another user
        return False
    return False


def _modified(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return float("inf")


def write_file(settings: OutputSettings, relpath: str, data: bytes) -> None:
    fs, root = filesystem(settings)
    write_atomic(fs, f"{root}/{relpath}", data)


def file_exists(settings: OutputSettings, relpath: str) -> bool:
    fs, root = filesystem(settings)
    return bool(fs.exists(f"{root}/{relpath}"))


def existing(settings: OutputSettings, relpaths: list[str]) -> set[str]:
    """Which of these files exist (one listing per fan-out directory, not one call per file)."""
    fs, root = filesystem(settings)
    by_dir: dict[str, list[str]] = {}
    for relpath in relpaths:
        by_dir.setdefault(relpath.rsplit("/", 1)[0] if "/" in relpath else "", []).append(relpath)
    found: set[str] = set()
    for directory, wanted in by_dir.items():
        base = f"{root}/{directory}" if directory else root
        try:
            names = {p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)}
        except FileNotFoundError:
            continue
        found.update(r for r in wanted if r.rsplit("/", 1)[-1] in names)
    return found
