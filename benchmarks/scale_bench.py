"""Benchmark: does the flow stay flat in memory and fast from 10k to 100k URLs?

    python benchmarks/scale_bench.py                          # 10k and 100k tiny images
    python benchmarks/scale_bench.py --counts 10000,50000     # other list lengths
    python benchmarks/scale_bench.py --batch-sizes 4,16,64    # images/s per --batch-size

(after ``pip install -e .``). The demo image server runs as a SEPARATE process
(``python -m imgtasks.demo``) so its CPU is not inside any measured process. Each
run writes the URL list to a file and runs ``flows/run.py --urls FILE --scheduler hybrid
--result-json FILE`` as a subprocess, sampling with psutil every ``--interval`` seconds the
RSS and CPU time of the flow (client) process and of each Dask worker process (its
children). Workers are labelled by thread count: the one with the most threads is the I/O
worker. The flow's wall time and cluster start-up come from its result JSON, the rows and
ok rows from its manifest; nothing is read from its printed text. A run that failed or left
no result JSON is INVALID (with the flow's last stderr line) and the bench exits 1.

Reported per run:

- images/s: URLs / the flow's own wall time (cluster start-up included), and end to end
  (interpreter start to exit);
- tasks/s: tasks reaching the scheduler (2 per batch: download + thumbnail) / the time
  after the cluster was up;
- peak RSS of the client process and of each worker: the kernel's high-water mark
  (``VmHWM``) where there is one, so a peak between two samples still counts; the
  client's is read once more from the ended process (``wait4``), so a peak in its last
  moment (the contact sheet) counts too;
- RSS through the largest run: each process's level at every tenth of the run, and how
  much it grew after the first fifth (warm-up), in MiB and bytes per URL. A peak is one
  moment; a level that keeps rising is what grows with the list. ``--trace CSV`` writes
  every process's RSS every 5 s of every run;
- sched share: CPU seconds of the client process / its wall time. In hybrid mode the
  scheduler (SpecCluster) runs inside the client process, so this is an upper bound of the
  scheduler's share: it also holds the client's own work (reading and de-duplicating the
  list, building graphs, collecting reports).

The goal: peak RSS at 100k within 20 % of the peak RSS at 10k, for every process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests
from flow_figures import (
    NoFigures,
    failure,
    flow_command,
    manifest_count,
    read_figures,
    subprocess_environment,
)

from imgtasks.demo import server_process

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
RSS_GOAL = 0.20
LEVEL_EVERY = 5.0  # seconds between two RSS levels kept per process (the trace)
WARM_UP = 0.2  # the first fifth of a run: workers and caches fill to their working size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_url_list(base: str, count: int, kind: str, path: Path) -> None:
    """The server's own list (``GET /urls``), streamed to a file."""
    with requests.get(f"{base}/urls", params={"count": count, "kind": kind}, stream=True) as r:
        r.raise_for_status()
        with open(path, "wb") as f:
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)


@dataclass
class Sample:
    """Peaks of one process over its life, and its RSS every LEVEL_EVERY seconds."""

    peak_rss: int = 0
    threads: int = 0
    cpu_s: float = 0.0
    levels: list[tuple[float, int]] = field(default_factory=list)  # (seconds in, RSS)

    def level_at(self, t: float) -> int:
        """The RSS kept last at or before ``t`` seconds into the run (0: none yet)."""
        before = [rss for when, rss in self.levels if when <= t]
        return before[-1] if before else 0


@dataclass
class Result:
    count: int
    batch_size: int | str
    wall: float  # end to end, interpreter start to exit
    flow_wall: float  # the flow's wall_s (its result JSON), cluster start-up included
    startup: float  # the flow's startup_s (its result JSON)
    batches: int  # the flow's batches (its result JSON)
    rows: int  # manifest rows
    ok: int  # manifest rows with status ok and the thumbnail file present
    client: Sample
    manifest_files: int = 0  # parts under out/manifest at the end (compacted: ~1 per 10k)
    workers: list[Sample] = field(default_factory=list)
    server_cpu_s: float = 0.0
    expected_workers: int = 0
    warnings: list[str] = field(default_factory=list)  # the flow's stderr (WARNING and up)
    problem: str = ""  # why the run is INVALID
    not_ok: dict[str, int] = field(default_factory=dict)  # statuses of rows not ok

    @property
    def valid(self) -> bool:
        return not self.problem

    @property
    def images_per_s(self) -> float:
        return self.count / max(self.flow_wall, 1e-9)

    @property
    def tasks_per_s(self) -> float:
        return 2 * self.batches / max(self.flow_wall - self.startup, 1e-9)

    @property
    def sched_share(self) -> float:
        return self.client.cpu_s / self.wall

    @property
    def io_worker(self) -> Sample:
        return self.workers[0] if self.workers else Sample()

    @property
    def cpu_workers(self) -> list[Sample]:
        return self.workers[1:]


def high_water_rss(pid: int) -> int:
    """The kernel's own peak RSS of ``pid`` (Linux ``VmHWM``), 0 where there is none.

    Sampling RSS every 0.2 s missed short peaks: at the end of a 10k-URL run the client's
    contact sheet took it from 141 to 167 MiB (sampled every 50 ms) for under a second,
    and this bench reported 142-143 MiB."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def reap(proc: subprocess.Popen) -> int | None:
    """None while ``proc`` runs; once it has ended, its peak RSS in bytes, from the
    kernel's own accounting of the ended process (``wait4``), and its exit code set.

    Why: the client's highest moment is its last second (the contact sheet: +13 MiB in
    0.6 s, then the exit), and sampling ``VmHWM`` every 0.2 s caught it in one 10k run
    (143 MiB, session 17) and missed it in the next (127, session 18): the 1M/10k ratio
    moved from x1.14 to x1.28 on that alone."""
    if not hasattr(os, "wait4"):  # not POSIX: the samples' peak only
        return None if proc.poll() is None else 0
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # KiB but on macOS


def sample(proc: psutil.Process, into: dict[int, Sample], seconds_in: float) -> None:
    for p in [proc, *proc.children(recursive=True)]:
        try:
            with p.oneshot():
                rss, threads, cpu = p.memory_info().rss, p.num_threads(), p.cpu_times()
        except psutil.Error:
            continue
        s = into.setdefault(p.pid, Sample())
        s.peak_rss = max(s.peak_rss, rss, high_water_rss(p.pid))
        s.threads = max(s.threads, threads)
        s.cpu_s = max(s.cpu_s, cpu.user + cpu.system)
        if not s.levels or seconds_in - s.levels[-1][0] >= LEVEL_EVERY:
            s.levels.append((seconds_in, rss))


def run_flow(
    urls: Path, count: int, batch_size: int | str, interval: float, server: psutil.Process
) -> Result:
    work = Path(tempfile.mkdtemp(prefix="scale-bench-out-"))
    out, figures_file = work / "out", work / "result.json"
    server_cpu = sum(server.cpu_times()[:2])
    options = ["--scheduler", "hybrid", "--batch-size", str(batch_size)]
    cmd = flow_command(
        urls, out, figures_file, [*options, "--dashboard-address", f"127.0.0.1:{free_port()}"]
    )
    samples: dict[int, Sample] = {}
    started = time.perf_counter()
    # stdout (the summary a person reads) is not kept: figures come from the result JSON.
    # stderr goes to a file: a pipe nobody reads while the flow runs could fill and stall it.
    with open(work / "stderr.txt", "w", encoding="utf-8") as err:
        proc = subprocess.Popen(
            cmd, env=subprocess_environment(), stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        flow = psutil.Process(proc.pid)
        while (exit_peak := reap(proc)) is None:
            with contextlib.suppress(psutil.Error):
                sample(flow, samples, time.perf_counter() - started)
            time.sleep(interval)
        wall = time.perf_counter() - started
        client_peak = samples.setdefault(proc.pid, Sample())
        client_peak.peak_rss = max(client_peak.peak_rss, exit_peak)
        stderr = (work / "stderr.txt").read_text(encoding="utf-8", errors="replace")
        manifest = manifest_count(out)
        not_ok = not_ok_statuses(out) if manifest.ok < manifest.rows else {}
        manifest_files = len(list((out / "manifest").glob("part-*.parquet")))
        try:
            figures, problem = read_figures(figures_file), ""
        except NoFigures as exc:
            figures, problem = {}, failure(proc.returncode, stderr, str(exc))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0 and not problem:
        problem = failure(proc.returncode, stderr)
    client = samples.pop(proc.pid, Sample())
    # the I/O worker first (most threads); helpers such as multiprocessing's resource
    # tracker (one thread, tiny) are not workers
    workers = sorted((s for s in samples.values() if s.threads > 2), key=lambda s: -s.threads)
    result = Result(
        count=count,
        batch_size=batch_size,
        wall=wall,
        flow_wall=float(figures.get("wall_s", 0.0)),
        startup=float(figures.get("startup_s", 0.0)),
        batches=int(figures.get("batches", 0)),
        rows=manifest.rows,
        ok=manifest.ok,
        client=client,
        manifest_files=manifest_files,
        workers=workers,
        server_cpu_s=sum(server.cpu_times()[:2]) - server_cpu,
        expected_workers=1 + (os.cpu_count() or 1),  # the flow's hybrid default
        # at the flow's default --log-level WARNING, stderr holds only warnings and errors
        warnings=[line for line in stderr.splitlines() if line.strip()],
        problem=problem,
        not_ok=not_ok,
    )
    # A row per URL is the guarantee; a URL that failed (a time-out on a loaded machine)
    # still has its row, and the run's memory and speed stand: said beside the table.
    if result.valid and result.rows != count:
        result.problem = f"{count} URLs gave {result.rows} manifest rows, {result.ok} ok"
    return result


def not_ok_statuses(out: Path) -> dict[str, int]:
    """How many rows of each status other than ok (read before the output is removed)."""
    import pandas as pd

    frame = pd.read_parquet(out / "manifest", columns=["status"])
    counts = frame.loc[frame["status"] != "ok", "status"].value_counts()
    return {str(status): int(n) for status, n in counts.items()}


def mib(n: int) -> str:
    return f"{n / MIB:.0f}"


def print_scale(results: Sequence[Result]) -> None:
    print(
        f"{'URLs':>8} {'rows ok':>9} {'wall s':>7} {'img/s':>7} {'e2e img/s':>9} "
        f"{'tasks/s':>8} {'client MiB':>10} {'io MiB':>7} {'cpu MiB':>11} {'sched share':>11}"
        f" {'manifest files':>14}"
    )
    for r in results:
        if not r.valid:
            print(f"{r.count:>8} INVALID: {r.problem}")
            continue
        cpus = "/".join(mib(w.peak_rss) for w in r.cpu_workers)
        print(
            f"{r.count:>8} {r.ok:>9} {r.flow_wall:>7.1f} {r.images_per_s:>7.0f} "
            f"{r.count / r.wall:>9.0f} {r.tasks_per_s:>8.0f} {mib(r.client.peak_rss):>10} "
            f"{mib(r.io_worker.peak_rss):>7} {cpus:>11} {r.sched_share:>10.0%}"
            f" {r.manifest_files:>14}"
        )
    for r in results:
        if r.valid:
            print(
                f"  {r.count} URLs: client CPU {r.client.cpu_s:.1f} s, I/O worker CPU "
                f"{r.io_worker.cpu_s:.1f} s, CPU workers "
                + ", ".join(f"{w.cpu_s:.1f} s" for w in r.cpu_workers)
                + f", demo server CPU {r.server_cpu_s:.1f} s (not in the flow), "
                f"wall end to end {r.wall:.1f} s, cluster start-up {r.startup:.1f} s; "
                f"peak threads: client {r.client.threads}, I/O worker {r.io_worker.threads}"
            )
        if r.valid and len(r.workers) != r.expected_workers:
            print(
                f"  {r.count} URLs: {len(r.workers)} worker processes seen, "
                f"{r.expected_workers} expected: a worker was restarted (its peaks are split)"
            )
        if r.valid and r.ok != r.count:
            statuses = ", ".join(f"{status} {n}" for status, n in r.not_ok.items())
            print(f"  {r.count} URLs: a row each, {r.ok} ok; not ok: {statuses or 'files missing'}")
        for line in r.warnings[:5]:
            print(f"  {r.count} URLs, flow stderr: {line[:160]}")
    valid = [r for r in results if r.valid]
    if len(valid) < 2:
        if len(results) >= 2:
            print("\npeak RSS ratio: n/a (fewer than two valid runs)")
        return
    small, big = valid[0], valid[-1]
    pairs = [("client", small.client, big.client), ("io worker", small.io_worker, big.io_worker)]
    pairs += [
        (f"cpu worker {i}", a, b)
        for i, (a, b) in enumerate(zip(small.cpu_workers, big.cpu_workers, strict=False))
    ]
    print(f"\npeak RSS ratio {big.count}/{small.count} (goal: within {RSS_GOAL:.0%})")
    for name, a, b in pairs:
        ratio = b.peak_rss / max(a.peak_rss, 1)
        verdict = "ok" if abs(ratio - 1) <= RSS_GOAL else "OVER"
        print(
            f"  {name:<14} {mib(a.peak_rss):>6} -> {mib(b.peak_rss):>6} MiB"
            f"  x{ratio:.2f}  {verdict}"
        )
    print(
        f"  images/s ratio x{big.images_per_s / small.images_per_s:.2f}, "
        f"tasks/s ratio x{big.tasks_per_s / small.tasks_per_s:.2f}"
    )


TENTHS = [i / 10 for i in range(1, 11)]
SETTLED = 0.9  # the growth is read up to here: the run's end adds its contact sheet
SETTLED_RUN_S = 300  # in a shorter run the first fifth is still start-up: no growth read


def processes(result: Result) -> list[tuple[str, Sample]]:
    named = [("client", result.client), ("io worker", result.io_worker)]
    return named + [(f"cpu worker {i}", w) for i, w in enumerate(result.cpu_workers)]


def print_levels(result: Result) -> None:
    """Each process's RSS at every tenth of the run, and how much it grew between the end
    of warm-up and the last tenth, per URL handled meanwhile."""
    span = SETTLED - WARM_UP
    print(
        f"\nRSS through the {result.count}-URL run, MiB, at each tenth of its "
        f"{result.wall:.0f} s; growth from {WARM_UP:.0%} to {SETTLED:.0%} of the run"
    )
    print(f"  {'':<14}" + "".join(f"{t:>7.0%}" for t in TENTHS) + f"{'growth':>11}")
    settled = result.wall >= SETTLED_RUN_S
    for name, s in processes(result):
        levels = [s.level_at(t * result.wall) for t in TENTHS]
        growth = f"{'-':>7}"
        if settled:
            grew = s.level_at(SETTLED * result.wall) - s.level_at(WARM_UP * result.wall)
            per_url = grew / max(span * result.count, 1)
            growth = f"{grew / MIB:>+7.1f} MiB ({per_url:+.1f} B/URL)"
        print(f"  {name:<14}" + "".join(f"{v / MIB:>7.1f}" for v in levels) + growth)
    if not settled:
        print(f"  (no growth read: a run under {SETTLED_RUN_S} s is still starting at 20 %)")


def write_trace(results: Sequence[Result], path: Path) -> None:
    """Every process's RSS every LEVEL_EVERY seconds of every valid run, as CSV."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("urls,process,seconds,rss_mib\n")
        for r in (r for r in results if r.valid):
            for name, s in processes(r):
                for seconds, rss in s.levels:
                    f.write(f"{r.count},{name},{seconds:.1f},{rss / MIB:.1f}\n")


def progress_line(what: str, result: Result) -> str:
    verdict = "" if result.valid else f", INVALID: {result.problem}"
    return f"[{what}: {result.wall:.1f} s{verdict}]"


def scale(
    counts: Sequence[int],
    batch_size: int | str,
    interval: float,
    workdir: Path,
    trace: Path | None = None,
) -> bool:
    """Print the scale table and the largest run's RSS levels; False if a run was INVALID."""
    results = []
    with server_process(0.0, 0.0) as (base, pid):
        server = psutil.Process(pid)
        for count in counts:
            urls = workdir / f"tiny-{count}.txt"
            write_url_list(base, count, "tiny", urls)
            result = run_flow(urls, count, batch_size, interval, server)
            results.append(result)
            print(progress_line(f"{count} tiny URLs, batch {batch_size}", result), flush=True)
    print(f"\nscale: tiny images, no latency, --scheduler hybrid, --batch-size {batch_size}")
    print_scale(results)
    valid = [r for r in results if r.valid]
    if valid:
        print_levels(valid[-1])
    if trace is not None:
        write_trace(results, trace)
        print(f"trace: {trace}")
    return len(valid) == len(results)


def batch_sizes(sizes: Sequence[int], interval: float, workdir: Path, tiny_count: int) -> bool:
    """Print images/s and tasks/s per batch size; False if a run was INVALID."""
    cases = [
        ("1000 photos, 100 ms", 0.1, "photos", 1000),
        ("tiny, no latency", 0.0, "tiny", tiny_count),
    ]
    table: dict[str, dict[int, Result]] = {}
    for name, latency, kind, count in cases:
        with server_process(latency, 0.0) as (base, pid):
            server = psutil.Process(pid)
            urls = workdir / f"{kind}-{count}.txt"
            write_url_list(base, count, kind, urls)
            for size in sizes:
                result = run_flow(urls, count, size, interval, server)
                table.setdefault(f"{name} ({count})", {})[size] = result
                print(progress_line(f"{name}, batch {size}", result), flush=True)
    print("\nimages/s by --batch-size (flow wall, cluster start-up included; x = vs the first)")
    print(f"{'case':<28}" + "".join(f"{f'batch {s}':>18}" for s in sizes))
    for name, row in table.items():
        first = next((r.images_per_s for r in row.values() if r.valid), None)
        cells = "".join(
            f"{f'{row[s].images_per_s:.0f} (x{row[s].images_per_s / first:.2f})':>18}"
            if row[s].valid and first
            else f"{'INVALID':>18}"
            for s in sizes
        )
        print(f"{name:<28}{cells}")
    print(f"{'tasks/s':<28}" + "".join(f"{'':>18}" for _ in sizes))
    for name, row in table.items():
        cells = (f"{row[s].tasks_per_s:>18.0f}" if row[s].valid else f"{'-':>18}" for s in sizes)
        print(f"{'  ' + name:<28}" + "".join(cells))
    invalid = [(name, s, r) for name, row in table.items() for s, r in row.items() if not r.valid]
    for name, size, r in invalid:
        print(f"  {name}, batch {size}: INVALID: {r.problem}")
    return not invalid


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Throughput and peak memory of flows/run.py at 10k-100k URLs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--counts", type=int_list, default=[10_000, 100_000], help="list lengths")
    parser.add_argument("--batch-size", default="auto", help="--batch-size (N or auto)")
    parser.add_argument(
        "--batch-sizes",
        type=int_list,
        help="instead: images/s at these batch sizes (1000 photos at 100 ms; tiny at 0 ms)",
    )
    parser.add_argument(
        "--tiny-count", type=int, default=10_000, help="tiny URLs in --batch-sizes mode"
    )
    parser.add_argument("--interval", type=float, default=0.2, help="psutil sampling, seconds")
    parser.add_argument(
        "--trace",
        type=Path,
        metavar="CSV",
        help=f"write every process's RSS every {LEVEL_EVERY:.0f} s of every run (--counts mode)",
    )
    args = parser.parse_args(argv)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        if args.batch_sizes:
            valid = batch_sizes(args.batch_sizes, args.interval, Path(tmp), args.tiny_count)
        else:
            valid = scale(
                sorted(args.counts), args.batch_size, args.interval, Path(tmp), args.trace
            )
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
