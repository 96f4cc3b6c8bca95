"""A measured cost model: how far one client and one scheduler go at 10 and 100 nodes.

    python benchmarks/cost_model.py                   # ~2-4 min on 2 quiet cores, ~8 at load 20
    python benchmarks/cost_model.py --quick           # smoke run, ~10-25 s
    python benchmarks/cost_model.py --profile 256     # + cProfile of the client at batch 256
    python benchmarks/cost_model.py --images-per-core 85   # skip measuring a worker
    python benchmarks/cost_model.py --memory 10000,1000000 # + peak RSS by list length
    python benchmarks/cost_model.py --load m.json --node-workers 2   # model a --save again

Three measurements on this machine, then a model:

1. **The client's CPU per URL**, at each ``--batch-sizes``: one real
   ``imgtasks.thumbnails(URL_FILE, client=...)`` call (``progress=False``,
   ``job_page=False``) — reading the list, classifying and de-duplicating, making batches,
   building each batch's graph and submitting it through ``imgtasks.flow``, collecting and
   tallying every batch report, the run log. Measured as this process's CPU time
   (``resource.getrusage``, every thread) around the call; per thread with psutil. The
   source stage alone (``url_batches``, no Dask) is measured too.
2. **The scheduler's CPU per task**, at ``--workers`` CPU workers (+ one I/O worker), by
   Dask's own instrumentation: ``client.run_on_scheduler(time.process_time)`` before and
   after each run, less the idle rate measured just before (heartbeats). The scheduler is
   the real ``dask scheduler`` command line in its own process; the workers are
   ``distributed.Worker`` objects in one other process (``--worker-host``; 32 worker
   processes would not fit 2 cores), each its own connection to the scheduler, with the
   README's resources (``io=N`` on the I/O worker, ``cpu=1`` on each CPU worker).
3. **A worker's throughput**: images/s per CPU-second of the worker processes of a local
   hybrid cluster running ``imgtasks.thumbnails`` on web-size JPEGs (512 px, ~30 KB) from
   the demo server (its own process, not counted).

In 1 and 2 the **node functions are patched in the worker process only**
(``imgtasks.nodes.download_batch`` / ``thumbnail_batch`` return at once a
``BatchReport`` shaped like a real one: 85 % ok, 10 % http_4xx, 5 % time-outs, failing
hosts named), so the cluster keeps up with the client and scheduler on 2 cores. The
client and scheduler run the real code unchanged: the functions travel by reference and
resolve to the patch when the worker unpickles them.

The model, for nodes of ``--node-cores`` cores, each with that many single-threaded CPU
workers and one I/O worker (the README's recipe): images/s = nodes x cores x the
measured images/s per core; scheduler tasks/s = 2 x images/s / batch size; scheduler
busy = idle rate + tasks/s x CPU per task, both extrapolated linearly in the number of
workers (Dask's ``decide_worker`` looks at every worker holding the task's resource);
client URLs/s = 1 / client CPU per URL (one core to itself). Goals (issue 16): the client
path >= 50,000 URLs/s; the scheduler <= 50 % busy at 50,000 URLs/s (~40 nodes) with the
recommended batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from flow_figures import subprocess_environment

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
GOAL_URLS_S = 50_000
GOAL_BUSY = 0.5
REFERENCE_NODE_IMAGES_S = 1_300  # issue 16's figure for one 16-core node (img2dataset's)
SCALES = (10, 100)
WEB_FILES, WEB_SIDE = 64, 512


# --- the patched node functions (worker host process only) --------------------------------


def fake_download_batch(batch, settings):
    from imgtasks.nodes import DownloadedBatch

    return DownloadedBatch(batch, (None,) * len(batch.entries), 0.001)


def fake_thumbnail_batch(downloaded, job, previous=None):
    """A report like a real crawl's: 85 % ok, 10 % http_4xx, 5 % time-outs."""
    from imgtasks.nodes import BatchReport, host_of

    entries = downloaded.batch.entries
    statuses = [_status_of(e.index) for e in entries]
    failed = [host_of(e.url) for e, s in zip(entries, statuses, strict=True) if s != "ok"]
    timeouts = statuses.count("timeout")
    return BatchReport(
        batch_id=downloaded.batch.batch_id,
        manifest_path=f"manifest/part-{job.run_id}-{downloaded.batch.batch_id:08d}.parquet",
        counts=dict(Counter(statuses)),
        entries=len(entries),
        bytes_in=30_000 * statuses.count("ok"),
        download_s=0.2 * len(entries),
        thumbnail_s=0.005 * len(entries),
        download_wall_s=0.5,
        thumbnail_wall_s=0.1,
        thumbnail_cpu_s=0.1,
        failed_hosts=dict(Counter(failed)),
        network_errors={"timeout: read timed out (20 s)": timeouts} if timeouts else {},
    )


def _status_of(index: int) -> str:
    return "ok" if index % 20 < 17 else "http_4xx" if index % 20 < 19 else "timeout"


def patch_nodes() -> None:
    import imgtasks.nodes

    imgtasks.nodes.download_batch = fake_download_batch
    imgtasks.nodes.thumbnail_batch = fake_thumbnail_batch


async def _host_workers(address: str, cpu_workers: int, io_threads: int) -> None:
    from distributed import Worker

    common = {"host": "127.0.0.1", "memory_limit": 0, "dashboard": False}
    workers = [Worker(address, nthreads=io_threads, resources={"io": io_threads}, **common)]
    workers += [
        Worker(address, nthreads=1, resources={"cpu": 1}, name=f"cpu-{i}", **common)
        for i in range(cpu_workers)
    ]
    await asyncio.gather(*workers)  # starts them
    await asyncio.Event().wait()  # until the parent terminates us


def worker_host(address: str, cpu_workers: int, io_threads: int) -> int:
    patch_nodes()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(_host_workers(address, cpu_workers, io_threads))
    return 0


# --- the cluster under measurement ---------------------------------------------------------


def dask_command() -> list[str]:
    dask = Path(sys.executable).with_name("dask")
    return [str(dask)] if dask.exists() else [sys.executable, "-m", "distributed.cli.dask"]


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
        time.sleep(0.1)
    raise RuntimeError(f"no scheduler file after {timeout:g} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def recipe_environment() -> dict[str, str]:
    """The README's cluster recipe: every process without Dask's debugging message log
    (which keeps ~1000 task messages per connection, URLs included)."""
    return subprocess_environment() | {"DASK_DISTRIBUTED__ADMIN__LOW_LEVEL_LOG_LENGTH": "0"}


@contextlib.contextmanager
def cost_cluster(cpu_workers: int, io_threads: int, work: Path) -> Iterator[tuple]:
    """A ``dask scheduler`` process and a worker host process; yields (client, their pids)."""
    from distributed import Client

    sched_file = work / f"scheduler-{cpu_workers}.json"
    sched_file.unlink(missing_ok=True)
    env, logs = recipe_environment(), open(work / f"cluster-{cpu_workers}.log", "w")  # noqa: SIM115
    cmd = [*dask_command(), "scheduler", "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)]
    scheduler = subprocess.Popen(cmd, env=env, stdout=logs, stderr=subprocess.STDOUT)
    host = None
    try:
        address = wait_for_file(sched_file, scheduler)["address"]
        cmd = [sys.executable, str(HERE), "--worker-host", address]
        cmd += ["--cpu-workers", str(cpu_workers), "--io-threads", str(io_threads)]
        host = subprocess.Popen(cmd, env=env, stdout=logs, stderr=subprocess.STDOUT)
        with Client(address, timeout=60, direct_to_workers=True) as client:
            client.wait_for_workers(cpu_workers + 1, timeout=120)
            yield client, {"scheduler": scheduler.pid, "worker host": host.pid}
    finally:
        for proc in (host, scheduler):
            if proc is not None:
                stop(proc)
        logs.close()


def scheduler_cpu(client) -> float:
    return float(client.run_on_scheduler(time.process_time))


def idle_rate(client, seconds: float) -> float:
    """The scheduler's CPU-s per s with nothing to do: heartbeats and its own timers."""
    before, started = scheduler_cpu(client), time.perf_counter()
    time.sleep(seconds)
    return (scheduler_cpu(client) - before) / (time.perf_counter() - started)


# --- measuring -----------------------------------------------------------------------------


@dataclass
class Run:
    """One ``imgtasks.thumbnails`` call against the cost cluster."""

    urls: int
    batch_size: int
    cpu_workers: int
    wall_s: float
    client_cpu_s: float
    scheduler_cpu_s: float  # idle rate x wall already taken off
    source_cpu_s: float = 0.0  # url_batches alone, no Dask
    threads: dict[str, float] = field(default_factory=dict)  # client CPU-s per thread

    @property
    def batches(self) -> int:
        return math.ceil(self.urls / self.batch_size)

    @property
    def tasks(self) -> int:
        return 2 * self.batches  # a download and a thumbnail node per batch

    @property
    def client_us_per_url(self) -> float:
        return 1e6 * self.client_cpu_s / self.urls

    @property
    def client_urls_s(self) -> float:
        return self.urls / max(self.client_cpu_s, 1e-9)

    @property
    def scheduler_us_per_task(self) -> float:
        return 1e6 * self.scheduler_cpu_s / self.tasks


def write_urls(path: Path, count: int) -> None:
    """Unique LAION-like URLs (~100 characters, 5,000 hosts); nothing fetches them."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            host = f"img{i % 5000}.cdn-{i % 97}.example.com"
            f.write(f"https://{host}/photos/2024/{i % 12 + 1:02d}/{i:010d}/picture-{i}.jpg\n")


def source_cpu(urls: Path, batch_size: int) -> tuple[float, int]:
    """CPU-s of reading, classifying and batching the list alone; the URLs seen."""
    from imgtasks.sources import SourceSettings, url_batches

    started = time.process_time()
    seen = sum(
        len(b.entries) for b in url_batches(SourceSettings(str(urls), batch_size=batch_size))
    )
    return time.process_time() - started, seen


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_cpu() -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}


def thread_names() -> dict[int, str]:
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


def client_run(
    client,
    urls: Path,
    count: int,
    batch_size: int,
    idle: float,
    work: Path,
    profile: cProfile.Profile | None = None,
) -> Run:
    import imgtasks

    out = work / f"out-{batch_size}-{time.monotonic_ns()}"
    workers = len(client.scheduler_info(n_workers=-1)["workers"]) - 1
    threads_before, sched_before = thread_cpu(), scheduler_cpu(client)
    cpu_before, started = own_cpu(), time.perf_counter()
    with profile or contextlib.nullcontext():
        result = imgtasks.thumbnails(
            str(urls), out, client=client, batch_size=batch_size, progress=False, job_page=False
        )
    wall, cpu = time.perf_counter() - started, own_cpu() - cpu_before
    sched = scheduler_cpu(client) - sched_before - idle * wall
    threads_after, names = thread_cpu(), thread_names()
    shutil.rmtree(out, ignore_errors=True)
    if result.entries != count or result.failed_batches:
        raise RuntimeError(f"{count} URLs gave {result.entries} rows, {result.failed_batches}")
    per_thread: Counter = Counter()
    for tid, after in threads_after.items():
        name = "main" if tid == threading.main_thread().native_id else names.get(tid, "other")
        per_thread[name.split("-")[0]] += after - threads_before.get(tid, 0.0)
    return Run(count, batch_size, workers, wall, cpu, sched, threads=dict(per_thread))


def urls_for(batch_size: int, most: int, max_batches: int) -> int:
    return min(most, batch_size * max_batches)


@dataclass
class Measured:
    batch_runs: list[Run]  # the batch sweep, at sweep_workers
    worker_runs: list[Run]  # the smallest batch size at each worker count
    idle: dict[int, float]  # CPU workers -> scheduler CPU-s per s when idle
    sweep_workers: int
    images_per_core: float
    images_note: str


def measure_cluster(args: argparse.Namespace, work: Path) -> Measured:
    batch_runs, worker_runs, idle = [], [], {}
    lists: dict[int, Path] = {}

    def url_file(count: int) -> Path:
        if count not in lists:
            lists[count] = work / f"urls-{count}.txt"
            write_urls(lists[count], count)
        return lists[count]

    sweep_at = args.workers[len(args.workers) // 2]
    smallest = min(args.batch_sizes)
    for workers in args.workers:
        with cost_cluster(workers, args.io_threads, work) as (client, _):
            idle[workers] = idle_rate(client, args.idle_seconds)
            sizes = args.batch_sizes if workers == sweep_at else [smallest]
            for size in sizes:
                count = urls_for(size, args.urls, args.max_batches)
                urls = url_file(count)
                run = client_run(client, urls, count, size, idle[workers], work)
                run.source_cpu_s, seen = source_cpu(urls, size)
                assert seen == count, (seen, count)
                if workers == sweep_at:
                    batch_runs.append(run)
                if size == smallest:
                    worker_runs.append(run)
                print(progress(run), flush=True)
            if args.profile and workers == sweep_at:
                count = urls_for(args.profile, args.urls, args.max_batches)
                profile_client(client, url_file(count), count, args, idle[workers], work)
    return Measured(batch_runs, worker_runs, idle, sweep_at, 0.0, "")


def progress(run: Run) -> str:
    return (
        f"[{run.urls} URLs, batch {run.batch_size}, {run.cpu_workers} CPU workers: "
        f"{run.wall_s:.1f} s wall, client {run.client_cpu_s:.2f} CPU-s, "
        f"scheduler {run.scheduler_cpu_s:.2f} CPU-s]"
    )


def profile_client(
    client, urls: Path, count: int, args: argparse.Namespace, idle: float, work: Path
) -> None:
    profile = cProfile.Profile(time.thread_time)  # CPU, not waits: the machine is shared
    run = client_run(client, urls, count, args.profile, idle, work, profile)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.profile_top)
    lines = [ln for ln in text.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    print(
        f"\ncProfile (CPU time) of the client's main thread, batch {args.profile}, {count} URLs "
        f"({run.client_us_per_url:.1f} us/URL with the profiler on; other threads: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(run.threads.items()) if k != "main")
        + "), top by own time:"
    )
    for line in lines[start : start + args.profile_top + 1]:
        print("  " + line[:150])


def web_images(where: Path) -> None:
    from imgtasks.demo.corpus import photo_like

    for i in range(WEB_FILES):
        buf = io.BytesIO()
        photo_like(WEB_SIDE, WEB_SIDE * 3 // 4, seed=1000 + i).save(buf, "JPEG", quality=85)
        (where / f"w{i}.jpg").write_bytes(buf.getvalue())


def node_throughput(count: int, cpu_workers: int, work: Path) -> tuple[float, str]:
    """Images/s per CPU-second of a local hybrid cluster's worker processes (real nodes)."""
    import imgtasks
    from imgtasks import cluster as clusters
    from imgtasks.demo import server_process

    files = work / "web"
    files.mkdir(exist_ok=True)
    web_images(files)
    with server_process(0.0, 0.0, "--files-dir", str(files)) as (base, _):
        urls = [f"{base}/files/w{i % WEB_FILES}.jpg?i={i}" for i in range(count)]
        settings = clusters.ClusterSettings(
            cpu_workers=cpu_workers, io_threads=16, dashboard_address="127.0.0.1:0"
        )
        client, cluster = clusters.connect(settings)
        try:
            procs = [psutil.Process(pid) for pid in client.run(os.getpid).values()]
            before = sum(sum(p.cpu_times()[:2]) for p in procs)
            result = imgtasks.thumbnails(
                urls,
                work / "node-out",
                client=client,
                batch_size=64,
                progress=False,
                job_page=False,
            )
            cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - before
        finally:
            client.close()
            cluster.close()
    if result.ok != count:
        raise RuntimeError(f"worker throughput run: {result.ok}/{count} ok")
    note = (
        f"measured: {count} web-size JPEGs ({WEB_SIDE} px, ~30 KB) through a local hybrid "
        f"cluster, batch 64: {cpu:.2f} CPU-s in the worker processes "
        f"({1000 * cpu / count:.1f} ms/image)"
    )
    return count / cpu, note


# --- peak memory by list length (--memory) ------------------------------------------------


def client_process(address: str, urls: str, batch_size: int) -> int:
    """``--client ADDRESS``: one run in a fresh process; its figures as JSON on stdout."""
    from distributed import Client

    import imgtasks

    with (
        Client(address, timeout=60, direct_to_workers=True) as client,
        tempfile.TemporaryDirectory() as out,
    ):
        result = imgtasks.thumbnails(
            urls, out, client=client, batch_size=batch_size, progress=False, job_page=False
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"entries": result.entries, "peak_rss": peak, "cpu_s": own_cpu()}))
    return 0


def memory_check(counts: Sequence[int], batch_size: int, work: Path) -> list[str]:
    """Peak RSS of a fresh client process, the scheduler and the worker host per list
    length (issue 16: flat from 10k to 1M URLs)."""
    rows = []
    with cost_cluster(2, 8, work) as (client, pids):
        procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        for count in counts:
            urls = work / f"memory-{count}.txt"
            write_urls(urls, count)
            peaks = dict.fromkeys(procs, 0)
            cmd = [sys.executable, str(HERE), "--client", client.scheduler.address]
            cmd += ["--urls-file", str(urls), "--batch-size-one", str(batch_size)]
            proc = subprocess.Popen(
                cmd, env=recipe_environment(), stdout=subprocess.PIPE, text=True
            )
            while proc.poll() is None:
                for name, p in procs.items():
                    peaks[name] = max(peaks[name], p.memory_info().rss)
                time.sleep(0.2)
            figures = json.loads(proc.stdout.read().strip().splitlines()[-1])
            if figures["entries"] != count:
                raise RuntimeError(f"memory run: {count} URLs gave {figures['entries']} rows")
            rows.append((count, figures["peak_rss"], peaks, figures["cpu_s"]))
            print(f"[memory: {count} URLs, client {figures['cpu_s']:.1f} CPU-s]", flush=True)
            urls.unlink()
    lines = ["", f"peak RSS by list length (MiB; batch {batch_size}; nodes patched)"]
    lines.append(
        f"{'URLs':>9} {'client':>7} {'scheduler':>9} {'worker host':>11} {'client CPU-s':>12}"
    )
    for count, client_peak, peaks, cpu in rows:
        lines.append(
            f"{count:>9,} {client_peak / 2**20:>7.0f} {peaks['scheduler'] / 2**20:>9.0f} "
            f"{peaks['worker host'] / 2**20:>11.0f} {cpu:>12.1f}"
        )
    (small, c0, p0, _), (big, c1, p1, _) = rows[0], rows[-1]
    ratios = {"client": c1 / c0} | {name: p1[name] / max(p0[name], 1) for name in p0}
    flat = all(r <= 1.2 for r in ratios.values())
    lines.append(
        f"goal: peak memory flat from {small:,} to {big:,} URLs (within 20 %): "
        + ("met" if flat else "NOT met")
        + " ("
        + ", ".join(f"{name} x{r:.2f}" for name, r in ratios.items())
        + ")"
    )
    return lines


# --- the model -----------------------------------------------------------------------------


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares a + b x; the slope never below 0 (noise must not predict savings)."""
    if len(points) < 2:
        return (points[0][1] if points else 0.0), 0.0
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in points) / sxx) if sxx else 0.0
    return my - slope * mx, slope


def heartbeats_s(workers: float) -> float:
    """Heartbeats per second the scheduler asks of this many workers: Dask's own rule,
    which stretches the interval past 200 workers (never much more than 200/s)."""
    from distributed.scheduler import heartbeat_interval

    return workers / heartbeat_interval(math.ceil(workers))


@dataclass
class Model:
    measured: Measured
    node_cores: int
    node_workers: int = 0  # Dask workers per node; 0: node_cores + 1

    def __post_init__(self) -> None:
        m = self.measured
        self.task_line = fit_line(
            [(r.cpu_workers + 1, r.scheduler_us_per_task) for r in m.worker_runs]
        )
        self.idle_line = fit_line([(heartbeats_s(w + 1), rate) for w, rate in m.idle.items()])
        self.by_batch = {r.batch_size: r for r in m.batch_runs}

    def workers(self, nodes: float) -> float:
        """Default: the README's recipe, a CPU worker per core and an I/O worker."""
        return nodes * (self.node_workers or self.node_cores + 1)

    def task_s(self, batch_size: int, workers: float) -> float:
        """Scheduler CPU-s per task: measured at this batch size, grown with the workers."""
        run = self.by_batch[batch_size]
        extra = self.task_line[1] * (workers - self.measured.sweep_workers - 1)
        return max(0.0, run.scheduler_us_per_task + extra) / 1e6

    def idle(self, workers: float) -> float:
        return max(0.0, self.idle_line[0] + self.idle_line[1] * heartbeats_s(workers))

    def busy(self, batch_size: int, nodes: float, images_s: float) -> float:
        tasks_s = 2 * images_s / batch_size
        return self.idle(self.workers(nodes)) + tasks_s * self.task_s(
            batch_size, self.workers(nodes)
        )

    def images_s(self, nodes: float) -> float:
        return nodes * self.node_cores * self.measured.images_per_core

    def recommend(self, nodes: float, images_s: float) -> int | None:
        fits = [b for b in sorted(self.by_batch) if self.busy(b, nodes, images_s) <= GOAL_BUSY]
        return fits[0] if fits else None


def report(model: Model, smallest_batch: int) -> list[str]:
    m = model.measured
    lines = ["", f"client: CPU per URL by batch size ({m.sweep_workers} CPU workers)"]
    lines.append(
        f"{'batch':>6} {'URLs':>7} {'client us/URL':>13} {'source us/URL':>13} "
        f"{'submit+reports':>14} {'URLs/s/core':>11} {'sched us/task':>13} {'wall URLs/s':>11}"
    )
    for r in m.batch_runs:
        source = 1e6 * r.source_cpu_s / r.urls
        lines.append(
            f"{r.batch_size:>6} {r.urls:>7} {r.client_us_per_url:>13.1f} {source:>13.1f} "
            f"{r.client_us_per_url - source:>14.1f} {r.client_urls_s:>11,.0f} "
            f"{r.scheduler_us_per_task:>13.0f} {r.urls / r.wall_s:>11,.0f}"
        )
    split = "; ".join(
        f"batch {r.batch_size}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.threads.items()))
        for r in m.batch_runs
    )
    lines.append(f"  client CPU-s by thread: {split}")
    lines += ["", f"scheduler: CPU per task at batch {smallest_batch} by CPU workers"]
    lines.append(f"{'workers':>8} {'tasks':>7} {'us/task':>8} {'idle CPU %':>10}")
    for r in m.worker_runs:
        lines.append(
            f"{r.cpu_workers:>8} {r.tasks:>7} {r.scheduler_us_per_task:>8.0f} "
            f"{100 * m.idle[r.cpu_workers]:>10.1f}"
        )
    a, k = model.task_line
    ia, ik = model.idle_line
    lines.append(
        f"  fit: {a:.0f} + {k:.2f} x workers us/task (linear far beyond {max(m.idle) + 1} "
        f"workers); idle {100 * ia:.2f} % + {100 * ik:.3f} % per heartbeat/s "
        f"({heartbeats_s(170):.0f}/s at 170 workers, {heartbeats_s(1700):.0f}/s at 1700)"
    )
    lines += ["", f"worker: {m.images_per_core:.0f} images/s per core ({m.images_note})"]
    lines += prediction(model)
    return lines


def prediction(model: Model) -> list[str]:
    cores, workers = model.node_cores, model.workers(1)
    lines = ["", f"predicted ceiling, nodes of {cores} cores, {workers:.0f} Dask workers each"]
    lines.append(
        f"{'nodes':>5} {'workers':>7} {'images/s':>9} {'batch':>6} {'sched tasks/s':>13} "
        f"{'sched busy':>10} {'client URLs/s':>13} {'clients':>7}"
    )
    for nodes in SCALES:
        images = model.images_s(nodes)
        for b in sorted(model.by_batch):
            busy = model.busy(b, nodes, images)
            client = model.by_batch[b].client_urls_s
            lines.append(
                f"{nodes:>5} {model.workers(nodes):>7.0f} {images:>9,.0f} {b:>6} "
                f"{2 * images / b:>13,.0f} {busy:>10.0%} {client:>13,.0f} "
                f"{math.ceil(images / client):>7}"
            )
        best = model.recommend(nodes, images)
        lines.append(
            f"  {nodes} nodes: "
            + (
                f"batch {best} keeps the scheduler under half busy"
                if best
                else "no measured batch size keeps the scheduler under half busy"
            )
        )
    return lines + goals(model)


def goals(model: Model) -> list[str]:
    nodes = GOAL_URLS_S / REFERENCE_NODE_IMAGES_S  # the nodes one client should feed (~40)
    best_b = max(model.by_batch, key=lambda b: model.by_batch[b].client_urls_s)
    best = model.by_batch[best_b].client_urls_s
    rec = model.recommend(nodes, GOAL_URLS_S)
    busy = model.busy(rec or max(model.by_batch), nodes, GOAL_URLS_S)
    verdict = "met" if rec is not None else "NOT met"
    client_verdict = "met" if best >= GOAL_URLS_S else "NOT met"
    return [
        "",
        f"goal: client path >= {GOAL_URLS_S:,} URLs/s: {client_verdict} "
        f"(best {best:,.0f} URLs/s per client core, batch {best_b})",
        f"goal: scheduler <= {GOAL_BUSY:.0%} busy at {GOAL_URLS_S:,} URLs/s "
        f"({nodes:.0f} nodes, {model.workers(nodes):.0f} workers): {verdict} "
        f"(batch {rec or max(model.by_batch)}: {busy:.0%} busy)",
    ]


def save(measured: Measured, path: str) -> None:
    Path(path).write_text(json.dumps(asdict(measured), indent=1))


def load(path: str) -> Measured:
    """Measurements saved by ``--save``: the model again without measuring."""
    data = json.loads(Path(path).read_text())
    data["batch_runs"] = [Run(**r) for r in data["batch_runs"]]
    data["worker_runs"] = [Run(**r) for r in data["worker_runs"]]
    data["idle"] = {int(w): rate for w, rate in data["idle"].items()}
    return Measured(**data)


# --- the command line ----------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Measured cost model of the client, scheduler and a worker; "
        "predictions for 10 and 100 nodes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--batch-sizes", type=int_list, default=[16, 64, 256, 1024])
    p.add_argument("--workers", type=int_list, default=[2, 8, 32], help="CPU workers")
    p.add_argument("--urls", type=int, default=100_000, help="URLs per client run, at most")
    p.add_argument("--max-batches", type=int, default=1000, help="batches per run, at most")
    p.add_argument("--io-threads", type=int, default=8, help="threads of the I/O worker")
    p.add_argument("--idle-seconds", type=float, default=3.0, help="idle scheduler sample")
    p.add_argument("--node-cores", type=int, default=16)
    p.add_argument(
        "--node-workers", type=int, default=0, help="Dask workers per node; 0: node cores + 1"
    )
    p.add_argument("--node-images", type=int, default=600, help="web images, worker run")
    p.add_argument("--images-per-core", type=float, help="use this instead of measuring")
    p.add_argument("--profile", type=int, metavar="BATCH", help="cProfile a client run")
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="a smoke run: small and fast")
    p.add_argument("--save", metavar="JSON", help="write the measurements here")
    p.add_argument("--load", metavar="JSON", help="model these measurements; measure nothing")
    p.add_argument(
        "--memory",
        type=int_list,
        metavar="COUNTS",
        help="also: peak RSS of client, scheduler, workers at these list lengths (slow at 1M)",
    )
    p.add_argument("--memory-batch-size", type=int, default=1024)
    p.add_argument("--worker-host", metavar="ADDRESS", help=argparse.SUPPRESS)
    p.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)
    p.add_argument("--urls-file", help=argparse.SUPPRESS)
    p.add_argument("--batch-size-one", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--cpu-workers", type=int, default=2, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker_host:
        return worker_host(args.worker_host, args.cpu_workers, args.io_threads)
    if args.client:
        return client_process(args.client, args.urls_file, args.batch_size_one)
    if args.quick:
        args.batch_sizes, args.workers, args.urls = [16, 256], [2], 2048
        args.idle_seconds, args.node_images = 0.3, 64
    if args.load:
        measured = load(args.load)
        if args.images_per_core:
            measured.images_per_core = args.images_per_core
        model = Model(measured, args.node_cores, args.node_workers)
        print("\n".join(report(model, min(r.batch_size for r in measured.worker_runs))))
        return 0
    average = os.getloadavg()[0]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {average:.1f}")
    with tempfile.TemporaryDirectory(prefix="cost-model-") as tmp:
        work = Path(tmp)
        measured = measure_cluster(args, work)
        if args.images_per_core:
            measured.images_per_core = args.images_per_core
            measured.images_note = "given with --images-per-core"
        else:
            per_core, note = node_throughput(args.node_images, 2, work)
            measured.images_per_core, measured.images_note = per_core, note
        memory = memory_check(args.memory, args.memory_batch_size, work) if args.memory else []
    if args.save:
        save(measured, args.save)
    model = Model(measured, args.node_cores, args.node_workers)
    print("\n".join(report(model, min(args.batch_sizes)) + memory))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} (2-core machine, shared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
