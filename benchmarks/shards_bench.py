"""Benchmark: ``--output-format webdataset`` against ``files`` on the demo corpus, side by
side in one run (goal: within 10 %).

    python benchmarks/shards_bench.py                    # 1000 images, 100 ms latency, 3 rounds
    python benchmarks/shards_bench.py --count 300 --latency 0 --rounds 5

One demo server (its own process, so its CPU lands on no measured process) and one URL
list; each round runs ``flows/run.py`` once per format, the order alternating between
rounds so neither always runs on a warmer machine. Times are the flow's own ``wall_s``
from its ``--result-json`` file, cluster start-up included, and the CPU-seconds of the
run's whole process tree (client, scheduler, workers: every process it waited for), which
other load on the machine moves far less than the wall clock; outputs are counted from the
manifest (files) or the shards' stats files (webdataset), never from printed text. A run
that did not produce all N outputs is INVALID. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import requests
from flow_figures import (
    NoFigures,
    children_cpu,
    failure,
    flow_command,
    manifest_count,
    read_figures,
    run_group,
)

from imgtasks.demo import server_process

FORMATS = ("files", "webdataset")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000, help="images")
    p.add_argument("--latency", type=float, default=0.1, help="demo server latency, seconds")
    p.add_argument("--rounds", type=int, default=3, help="runs of each format")
    p.add_argument("--shard-size", type=int, default=10_000, help="--shard-size of the run")
    p.add_argument("--options", default="", help="more flows/run.py options, space-separated")
    return p.parse_args(argv)


def outputs(fmt: str, out: Path) -> int:
    """Images the run produced: ok manifest rows with their file, or the shards' successes."""
    if fmt == "files":
        return manifest_count(out).ok
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    return sum(s["successes"] for s in stats)


def run_once(
    fmt: str, urls: Path, work: Path, n: int, args: argparse.Namespace
) -> tuple[float, float] | str:
    """The flow's wall time and its process tree's CPU-seconds, or why the run is INVALID."""
    out, figures_file = work / f"{fmt}-out", work / f"{fmt}.json"
    options = ["--output-format", fmt, "--shard-size", str(args.shard_size), *args.options.split()]
    cpu0 = children_cpu()
    proc = run_group(flow_command(urls, out, figures_file, options), 900)
    cpu = children_cpu() - cpu0
    try:
        figures = read_figures(figures_file)
    except NoFigures as exc:
        return failure(proc.returncode, proc.stderr, str(exc))
    made = outputs(fmt, out)
    if made != n:
        return f"{made} of {n} outputs"
    shutil.rmtree(out)  # the next run starts from an empty --out
    return float(figures["wall_s"]), cpu


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    times: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
    cpus: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
    with tempfile.TemporaryDirectory() as tmp, server_process(args.latency) as (base, _):
        work = Path(tmp)
        listed = requests.get(f"{base}/urls", params={"count": args.count}, timeout=30)
        urls = work / "urls.txt"
        urls.write_text(listed.text)
        for round_ in range(args.rounds):
            order = FORMATS if round_ % 2 == 0 else FORMATS[::-1]
            for fmt in order:
                run = run_once(fmt, urls, work, args.count, args)
                if isinstance(run, str):
                    print(f"{fmt}: INVALID: {run}", file=sys.stderr)
                    return 1
                times[fmt].append(run[0])
                cpus[fmt].append(run[1])
                print(
                    f"round {round_ + 1} {fmt:<11} {run[0]:7.2f} s {run[1]:7.2f} CPU-s", flush=True
                )
    print(report(times, cpus, args))
    return 0


def report(
    times: dict[str, list[float]], cpus: dict[str, list[float]], args: argparse.Namespace
) -> str:
    median = {fmt: statistics.median(t) for fmt, t in times.items()}
    cpu = {fmt: statistics.median(c) for fmt, c in cpus.items()}
    lines = [
        f"\n{args.count} images, {args.latency * 1000:.0f} ms latency, {args.rounds} rounds",
        f"{'format':<12}{'median s':>10}{'images/s':>10}{'CPU-s':>8}   all runs (wall)",
    ]
    for fmt in FORMATS:
        runs = " ".join(f"{t:.2f}" for t in times[fmt])
        rate = args.count / median[fmt]
        lines.append(f"{fmt:<12}{median[fmt]:>10.2f}{rate:>10.1f}{cpu[fmt]:>8.2f}   {runs}")
    for what, figures in (("wall", median), ("CPU", cpu)):
        ratio = figures["webdataset"] / figures["files"]
        verdict = "within" if ratio <= 1.10 else "NOT within"
        lines.append(f"webdataset / files, {what:<4} = {ratio:.3f} ({verdict} 10 %)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
