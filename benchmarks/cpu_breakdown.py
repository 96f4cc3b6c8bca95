"""Where one run's CPU went, per process: start-up, each stage, transfers, manifest and file
writes, scheduler, client, idle; and CPU per image, everything included, against the stages
alone (issue 15's headline figure: <= 3.5 ms per web-size image, within 1.3x of the stages).

    python benchmarks/cpu_breakdown.py                          # 3000 web-size images, 0 ms
    python benchmarks/cpu_breakdown.py --kind photos --count 1000 --latency 0.1   # seed task
    python benchmarks/cpu_breakdown.py -- --batch-size 64 --scheduler processes
    python benchmarks/cpu_breakdown.py --ab config:distributed.scheduler.work-stealing=False

One ``imgtasks.thumbnails`` call (what ``flows/run.py`` runs) on a cluster this script starts,
against a demo server in its own process. Sources, all read from outside the run's code:

- every process's CPU (``/proc``, psutil): at connect (its start-up) and over the run;
  per thread, named from inside each process (``threading.enumerate``), so a worker's
  event loop (comms, (de)serialization, heartbeats), its task threads, its download
  threads and Dask's profiler thread are told apart, and so are the client's main
  thread and the event loop its scheduler runs on;
- the stages' own CPU counters (``imgtasks.stagecpu``: thread CPU inside ``fetch``,
  ``make_thumbnail``, hashing, each thumbnail file, each manifest part, each node);
- Dask's task stream (compute and transfer wall time per stage);
- "stages alone": ``fetch_many`` and ``make_thumbnail`` run here, standalone, on a sample of
  the same URLs before the cluster starts.

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dask
import psutil
import requests
from distributed import get_task_stream

import imgtasks
from imgtasks import cluster as clusters
from imgtasks import stagecpu
from imgtasks.demo import server_process
from imgtasks.download import DownloadSettings, fetch_many
from imgtasks.sources import DEFAULT_BATCH_SIZE
from imgtasks.thumbnail import ThumbSettings, make_thumbnail

GOAL_MS = 3.5
GOAL_RATIO = 1.3


# --------------------------------------------------------------------------- measuring


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of every live thread of ``pid``, by native thread id."""
    try:
        return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
    except psutil.Error:
        return {}


def process_cpu(pid: int) -> float:
    """CPU seconds of ``pid``; NaN once it has gone (a worker its nanny restarted)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return math.nan
    return times.user + times.system


def thread_names() -> dict[int, str]:
    """This process's threads' names by native id (run inside every worker too)."""
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


GROUPS = (  # (pattern on the thread's name, group), first match wins
    (r"^imgtasks-dl", "download threads (fetch: HTTP, in the node's pool)"),
    (r"Dask-Default-Threads|^ThreadPoolExecutor", "task threads (node code)"),
    (r"^Dask-Offload", "offload thread ((de)serializing big messages)"),
    (r"^Profile", "Dask's profiler thread (stack sampling)"),
    (r"^IO loop|^AsyncProcess|^TCP-Executor", "event loop thread"),
)


def group_of(name: str, role: str) -> str:
    if name == "MainThread":
        return (
            "main thread (client: graphs, results, tally)"
            if role == "client"
            else ("event loop (comms, (de)serialization, heartbeats)")
        )
    for pattern, group in GROUPS:
        if re.search(pattern, name):
            if group == "event loop thread" and role == "client":
                return "event loop thread (scheduler, nannies, client comms)"
            return group
    return "other threads"


@dataclass
class Proc:
    """One process of the run, as measured from outside and from inside."""

    name: str
    pid: int
    role: str  # client | worker | server
    startup_cpu: float = 0.0  # CPU it had spent when the run began
    before: dict[int, float] = field(default_factory=dict)
    cpu0: float = 0.0
    run_cpu: float = 0.0
    threads: dict[str, float] = field(default_factory=dict)  # group -> run CPU
    counters: dict[str, tuple[float, int]] = field(default_factory=dict)

    def start(self) -> None:
        self.cpu0 = self.startup_cpu = process_cpu(self.pid)
        self.before = thread_cpu(self.pid)

    def stop(self, names: dict[int, str]) -> None:
        self.run_cpu = process_cpu(self.pid) - self.cpu0
        groups: dict[str, float] = defaultdict(float)
        for tid, cpu in thread_cpu(self.pid).items():
            name = names.get(tid, "?")
            groups[group_of(name, self.role)] += cpu - self.before.get(tid, 0.0)
        # Threads that ended during the run (each batch's download pool, for one)
        groups["threads that ended during the run"] += self.run_cpu - sum(groups.values())
        self.threads = dict(groups)


# --------------------------------------------------------------------------- stages alone


@dataclass(frozen=True)
class Alone:
    fetch_ms: float
    thumbnail_ms: float
    images: int

    @property
    def total_ms(self) -> float:
        return self.fetch_ms + self.thumbnail_ms


def stages_alone(urls: Sequence[str], batch_size: int) -> Alone:
    """fetch_many (in batches, as the download node calls it) and make_thumbnail, run here
    alone: this process's CPU per image."""
    settings, thumb = DownloadSettings(), ThumbSettings()
    bodies: list[bytes] = []
    cpu0 = process_cpu(os.getpid())
    for start in range(0, len(urls), batch_size):
        results = fetch_many(urls[start : start + batch_size], settings)
        bodies += [r.content for r in results if r.ok and r.content]
    fetch_cpu = process_cpu(os.getpid()) - cpu0
    cpu0 = time.thread_time()
    for body in bodies:
        make_thumbnail(body, thumb)
    thumb_cpu = time.thread_time() - cpu0
    n = max(1, len(bodies))
    return Alone(1000 * fetch_cpu / n, 1000 * thumb_cpu / n, len(bodies))


# --------------------------------------------------------------------------- the run


def batch_size_arg(text: str) -> int | None:
    return None if text == "auto" else int(text)


def flow_settings(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cpu_breakdown.py -- ")
    p.add_argument("--scheduler", default="hybrid")
    p.add_argument("--cpu-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--io-threads", type=int, default=clusters.DEFAULT_IO_THREADS)
    p.add_argument("--batch-size", type=batch_size_arg, default=None, help="N or auto")
    p.add_argument("--window", default="0")
    p.add_argument("--dashboard-address", default="127.0.0.1:0")
    p.add_argument("--no-job-page", action="store_true")
    p.add_argument("--insecure", action="store_true")
    return p.parse_args(argv)


@dataclass
class Run:
    result: imgtasks.Result
    connect_s: float
    connect_cpu: float
    procs: list[Proc]
    stream: list[dict]
    wall_s: float


@contextmanager
def environment(assignments: dict[str, str]) -> Iterator[None]:
    """Set variables for one run (workers inherit them), then restore the old values."""
    old = {k: os.environ.get(k) for k in assignments}
    os.environ.update(assignments)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_once(argv: Sequence[str], urls: Sequence[str], server_pid: int, work: Path) -> Run:
    args = flow_settings(argv)
    settings = clusters.ClusterSettings(
        kind=args.scheduler,
        cpu_workers=args.cpu_workers,
        io_threads=args.io_threads,
        dashboard_address=args.dashboard_address,
        insecure=args.insecure,
    )
    me = os.getpid()
    cpu0, t0 = process_cpu(me), time.perf_counter()
    client, cluster = clusters.connect(settings)
    try:
        connect_s, connect_cpu = time.perf_counter() - t0, process_cpu(me) - cpu0
        procs = processes(client, server_pid)
        client.run(stagecpu.reset)
        stagecpu.reset()
        for proc in procs:
            proc.start()
        t0 = time.perf_counter()
        with get_task_stream(client) as stream:
            result = imgtasks.thumbnails(
                list(urls),
                work / "out",
                client=client,
                batch_size=args.batch_size,
                window=int(args.window) if args.window.isdigit() else args.window,
                progress=False,
                job_page=not args.no_job_page,
            )
        wall = time.perf_counter() - t0
        names = client.run(thread_names) | {"client": thread_names()}
        counters = client.run(stagecpu.snapshot) | {"client": stagecpu.snapshot()}
        for proc in procs:
            key = "client" if proc.role == "client" else proc.name.split(" @ ")[-1]
            proc.stop(names.get(key, {}))
            proc.counters = counters.get(key, {})
        return Run(result, connect_s, connect_cpu, procs, list(stream.data), wall)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def processes(client, server_pid: int) -> list[Proc]:
    pids = client.run(os.getpid)
    info = client.scheduler_info(n_workers=-1)["workers"]
    procs = [Proc("client + scheduler + nannies", os.getpid(), "client")]
    for address, pid in sorted(pids.items()):
        kind = ",".join(sorted(info[address].get("resources") or {})) or "any"
        if pid == os.getpid():
            continue  # a threads cluster in this process: the client's row has it
        procs.append(Proc(f"worker {kind} @ {address}", pid, "worker"))
    procs.append(Proc("demo server (not counted per image)", server_pid, "server"))
    return procs


# --------------------------------------------------------------------------- report


def stream_summary(stream: list[dict]) -> dict[tuple[str, str], tuple[float, int]]:
    """Wall seconds and count per (stage, action) from Dask's task stream."""
    out: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for task in stream:
        stage = str(task.get("key", "?")).split("-")[0].strip("('\"")
        for ss in task.get("startstops", ()):
            entry = out[(stage, ss["action"])]
            entry[0] += ss["stop"] - ss["start"]
            entry[1] += 1
    return {k: (v[0], int(v[1])) for k, v in out.items()}


COUNTER_ORDER = (
    "download node",
    "fetch",
    "thumbnail node",
    "make_thumbnail",
    "sha256",
    "thumbnail file",
    "manifest part",
)


def counter_lines(counters: dict[str, tuple[float, int]], n: int) -> list[str]:
    lines = []
    for name in sorted(counters, key=lambda c: ((*COUNTER_ORDER, c)).index(c)):
        cpu, calls = counters[name]
        lines.append(
            f"        {name:<32}{cpu:7.2f} s {1000 * cpu / n:7.3f} ms/image  ({calls} calls)"
        )
    node = counters.get("thumbnail node")
    if node:
        parts = ("make_thumbnail", "sha256", "thumbnail file", "manifest part")
        rest = node[0] - sum(counters.get(p, (0.0, 0))[0] for p in parts)
        lines.append(
            f"        {'  node rest: rows, records, report':<32}{rest:7.2f} s "
            f"{1000 * rest / n:7.3f} ms/image"
        )
    return lines


def report(run: Run, alone: Alone | None, n: int) -> str:
    lines = [
        f"{run.result.ok}/{run.result.entries} ok in {run.wall_s:.2f} s "
        f"({n / run.wall_s:.0f} images/s); cluster start-up {run.connect_s:.2f} s wall, "
        f"{run.connect_cpu:.2f} CPU-s in this process"
    ]
    counted_cpu = startup = 0.0
    for proc in run.procs:
        idle = max(0.0, run.wall_s - proc.run_cpu)
        # this process's own earlier CPU (imports, stages alone, earlier runs) is not the
        # run's: its start-up is what connecting the cluster cost
        before = run.connect_cpu if proc.role == "client" else proc.startup_cpu
        lines.append(
            f"  {proc.name}: {proc.run_cpu:.2f} CPU-s in the run "
            f"({1000 * proc.run_cpu / n:.2f} ms/image), start-up {before:.2f}, "
            f"off-CPU {idle:.1f} s of {run.wall_s:.1f}"
        )
        for group, cpu in sorted(proc.threads.items(), key=lambda kv: -kv[1]):
            if abs(cpu) >= 0.005:
                lines.append(f"      {group:<58}{cpu:7.2f} s")
        lines += counter_lines(proc.counters, n)
        if proc.role != "server":
            counted_cpu += proc.run_cpu
            startup += proc.startup_cpu if proc.role == "worker" else 0.0
    startup += run.connect_cpu
    lines.append("  Dask task stream (wall s, count):")
    for (stage, action), (secs, count) in sorted(stream_summary(run.stream).items()):
        lines.append(f"      {stage:<12} {action:<12}{secs:8.2f} s  {count:6d}")
    per_image = 1000 * counted_cpu / n
    lines.append(
        f"CPU per image, client + workers, the run: {per_image:.2f} ms "
        f"({counted_cpu:.2f} CPU-s / {n}); with start-up "
        f"(cluster and workers, {startup:.2f} CPU-s): {1000 * (counted_cpu + startup) / n:.2f} ms"
    )
    if alone is not None:
        ratio = per_image / alone.total_ms
        verdict = "met" if per_image <= GOAL_MS and ratio <= GOAL_RATIO else "NOT met"
        lines.append(
            f"stages alone ({alone.images} images, here): fetch {alone.fetch_ms:.2f} + "
            f"make_thumbnail {alone.thumbnail_ms:.2f} = {alone.total_ms:.2f} ms/image; "
            f"the run is {ratio:.2f}x that. Goal <= {GOAL_MS} ms and <= {GOAL_RATIO}x: {verdict}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


# name, environment, Dask config, flow options added after the ones after --
Variant = tuple[str, dict[str, str], dict[str, object], list[str]]


def parse_ab(text: str | None) -> list[Variant]:
    """``env:NAME=VALUE[,...]``: B sets those variables (workers inherit them);
    ``config:key=VALUE[,...]``: B runs under ``dask.config.set`` (the nannies hand the
    client's config to their workers, so it reaches them too; a ``DASK_*`` variable alone
    would not: the handed-over config wins over the worker's environment);
    ``args:--batch-size 64``: B adds these flow options."""
    variants: list[Variant] = [("A", {}, {}, [])]
    if text:
        kind, _, rest = text.partition(":")
        if kind == "args":
            return [*variants, (f"B {rest}", {}, {}, rest.split())]
        if kind not in ("env", "config") or "=" not in rest:
            raise SystemExit(
                "cpu_breakdown.py: error: --ab takes env:NAME=VALUE, config:k=V or args:OPTIONS"
            )
        pairs = dict(item.split("=", 1) for item in rest.split(","))
        if kind == "env":
            variants.append((f"B {rest}", pairs, {}, []))
        else:
            variants.append((f"B {rest}", {}, {k: _value(v) for k, v in pairs.items()}, []))
    return variants


def _value(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--kind", default="web", choices=("web", "photos", "tiny"), help="corpus")
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--alone", type=int, default=600, help="images for the stages alone (0: skip)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--ab", help="env:NAME=VALUE: alternate runs without and with it")
    p.add_argument("flow_args", nargs="*", help="after --: flows/run.py-like options")
    args = p.parse_args(argv)
    variants = parse_ab(args.ab)
    jitter = "0" if args.latency == 0 else "0.02"
    batch_size = flow_settings(args.flow_args).batch_size or DEFAULT_BATCH_SIZE
    with server_process(args.latency, float(jitter)) as (base, server_pid):
        params = {"count": args.count, "kind": args.kind}
        urls = requests.get(f"{base}/urls", params=params, timeout=60).text.split()
        print(
            f"{len(urls)} {args.kind} images, latency {args.latency * 1000:.0f} ms, "
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        alone = stages_alone(urls[: args.alone], batch_size) if args.alone else None
        for i in range(args.repeat):
            for name, env, config, extra in variants if i % 2 == 0 else variants[::-1]:
                work = Path(tempfile.mkdtemp(prefix="imgtasks-cpu-"))
                try:
                    with environment(env), dask.config.set(config):
                        run = run_once([*args.flow_args, *extra], urls, server_pid, work)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                print(f"\nrun {i + 1}, {name}:")
                print(report(run, alone, len(urls)), flush=True)
        print(f"\nload average at the end {os.getloadavg()[0]:.2f} (the machine is shared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
