"""Where the flow's CPU goes: wall time, CPU seconds and page faults per process of one
run, cluster start-up excluded, against a demo server in its own process.

    python benchmarks/flow_cpu.py                            # 1000 images, 100 ms, hybrid
    python benchmarks/flow_cpu.py --repeat 3 --ab dask-malloc-trim
    python benchmarks/flow_cpu.py -- --scheduler processes --batch-size 32

Arguments after ``--`` shape the run as ``flows/run.py``'s do (``--scheduler``,
``--cpu-workers``, ``--io-threads``, ``--batch-size``, ``--window``, ``--dashboard-address``,
``--insecure``);
the run itself is one ``imgtasks.thumbnails`` call on a client this script starts.
``--ab dask-malloc-trim`` alternates runs with our worker environment and with Dask's
default ``MALLOC_TRIM_THRESHOLD_=65536`` (see ``imgtasks.cluster``), so both see the same
machine load; on a shared machine compare several pairs, not one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

import imgtasks
from imgtasks import cluster as clusters
from imgtasks.demo import server_process

VARIANTS = {
    "ours": clusters.WORKER_PRE_SPAWN_ENVIRON,
    "dask-malloc-trim": {"MALLOC_TRIM_THRESHOLD_": 65536},  # Dask's default
}


@dataclass(frozen=True)
class Usage:
    cpu_s: float
    faults: int


def usage(proc: psutil.Process) -> Usage:
    times = proc.cpu_times()
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return Usage(times.user + times.system, int(fields[7]))  # minflt


def flow_settings(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flow_cpu.py -- ")
    p.add_argument("--scheduler", default="hybrid")
    p.add_argument("--cpu-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--io-threads", type=int, default=clusters.DEFAULT_IO_THREADS)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--dashboard-address", default=clusters.DEFAULT_DASHBOARD)
    p.add_argument("--insecure", action="store_true")
    return p.parse_args(argv)


def run_once(
    argv: Sequence[str], count: int, base: str, server: psutil.Process, variant: str
) -> None:
    work = Path(tempfile.mkdtemp(prefix="imgtasks-flow-cpu-"))
    urls = requests.get(f"{base}/urls", params={"count": count}, timeout=60).text.split()
    args = flow_settings(argv)
    settings = clusters.ClusterSettings(
        kind=args.scheduler,
        cpu_workers=args.cpu_workers,
        io_threads=args.io_threads,
        dashboard_address=args.dashboard_address,
        worker_environ=VARIANTS[variant],
        insecure=args.insecure,
    )
    started = time.perf_counter()
    client, cluster = clusters.connect(settings)
    try:
        startup = time.perf_counter() - started
        pids = client.run(os.getpid)
        kinds = {
            address: ",".join(sorted(info.get("resources") or {})) or "any"
            for address, info in client.scheduler_info(n_workers=-1)["workers"].items()
        }
        procs = {f"worker {kinds[a]}": psutil.Process(pid) for a, pid in pids.items()}
        procs |= {"client + scheduler": psutil.Process(), "demo server": server}
        before = {name: usage(p) for name, p in procs.items()}
        result = imgtasks.thumbnails(
            urls,
            work / "out",
            client=client,
            batch_size=args.batch_size,
            window=args.window,
            progress=False,
        )
        after = {name: usage(p) for name, p in procs.items()}
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    report(result, startup, before, after)


def report(result: imgtasks.Result, startup: float, before, after) -> None:
    wall = result.wall_s
    print(
        f"  {result.ok}/{result.entries} ok in {wall:.2f} s "
        f"({result.images_per_s:.0f} images/s; start-up {startup:.1f} s)"
    )
    total = 0.0
    for name in sorted(after):
        cpu = after[name].cpu_s - before[name].cpu_s
        total += cpu
        faults = after[name].faults - before[name].faults
        print(f"    {name:<22} {cpu:6.2f} CPU-s  {faults:>9,} page faults")
    print(f"    {'total':<22} {total:6.2f} CPU-s  ({total / wall:.2f} cores busy)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--latency", type=float, default=0.1)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--ab", choices=sorted(set(VARIANTS) - {"ours"}), help="alternate with this")
    p.add_argument(
        "flow_args", nargs="*", help="after --: the run's shape, as flows/run.py takes it"
    )
    args = p.parse_args(argv)
    variants = ["ours", args.ab] if args.ab else ["ours"]
    with server_process(args.latency) as (base, pid):
        server = psutil.Process(pid)
        for i in range(args.repeat):
            for variant in variants:
                # A nanny copies its pre-spawn variables into this process's environment,
                # which later workers inherit: start every run from a clean one.
                os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
                print(f"run {i + 1}, {variant}:", flush=True)
                run_once(args.flow_args, args.count, base, server, variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
