"""Where the flow's CPU goes: wall time, CPU seconds and page faults per process of one
run, cluster start-up excluded, against a demo server in its own process.

    python benchmarks/flow_cpu.py                            # 1000 images, 100 ms, hybrid
    python benchmarks/flow_cpu.py --repeat 3 --ab dask-malloc-trim
    python benchmarks/flow_cpu.py -- --scheduler processes --batch-size 32

Arguments after ``--`` go to ``flows/run.py`` (its ``--urls``/``--out`` are set here).
``--ab dask-malloc-trim`` alternates runs with our worker environment and with Dask's
default ``MALLOC_TRIM_THRESHOLD_=65536`` (see ``imgtasks.cluster``), so both see the same
machine load; on a shared machine compare several pairs, not one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "flows"))

import run as flow  # noqa: E402  (flows/run.py)

from imgtasks import cluster as clusters  # noqa: E402
from imgtasks.demo_server import server_process  # noqa: E402
from imgtasks.nodes import JobSettings  # noqa: E402
from imgtasks.sources import url_batches  # noqa: E402

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


def run_once(
    argv: Sequence[str], count: int, base: str, server: psutil.Process, variant: str
) -> None:
    work = Path(tempfile.mkdtemp(prefix="imgtasks-flow-cpu-"))
    urls = requests.get(f"{base}/urls", params={"count": count}, timeout=60).text.split()
    (work / "urls.txt").write_text("\n".join(urls) + "\n")
    job = flow.parse_job(
        ["--urls", str(work / "urls.txt"), "--out", str(work / "out"), "--no-progress", *argv]
    )
    settings = dataclasses.replace(job.cluster, worker_environ=VARIANTS[variant])
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
        wiring = flow.Wiring(
            job.download,
            JobSettings(job.thumb, job.output, flow.new_run_id()),
            uuid.uuid4().hex[:8],
            route=clusters.has_routing(client),
        )
        window = job.window or flow.default_window(client, job.batch_size)
        tally = flow.Tally(total=count)
        t0 = time.perf_counter()
        flow.stream_batches(
            client, url_batches(job.source), wiring, window, tally, flow.Progress(False, None)
        )
        wall = time.perf_counter() - t0
        after = {name: usage(p) for name, p in procs.items()}
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    report(tally, wall, startup, window, before, after)


def report(tally: flow.Tally, wall: float, startup: float, window: int, before, after) -> None:
    print(
        f"  {tally.counts.get('ok', 0)}/{tally.entries} ok in {wall:.2f} s "
        f"({tally.entries / wall:.0f} images/s; start-up {startup:.1f} s; window {window})"
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
    p.add_argument("flow_args", nargs="*", help="after --: flows/run.py arguments")
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
