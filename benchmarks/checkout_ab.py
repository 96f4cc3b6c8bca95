"""Interleaved A/B of ``flows/run.py`` from two checkouts (or with two sets of options).

    python benchmarks/checkout_ab.py --a ../old-checkout            # old code against this one
    python benchmarks/checkout_ab.py --b-options="--batch-size 128" --repeat 6
    python benchmarks/checkout_ab.py --b-options=--insecure     # one option: the = form
    python benchmarks/checkout_ab.py --a ../old --kind photos --count 1000 --latency 0.1

One demo server in its own process, one URL list (``--count`` images of ``--kind``), then
``--repeat`` rounds of one A run and one B run, the order flipping each round. Each run is
``CHECKOUT/flows/run.py`` with ``PYTHONPATH=CHECKOUT``, timed from launch to exit; its CPU
is its whole process tree's (client, scheduler, workers; ``getrusage`` of the children).
Both checkouts get their bytecode written first (``flow_figures.compile_project``). A
run that does not finish every URL ``ok`` (from its result JSON), or is still running
after 600 s + 1 s per URL, is INVALID and left out of the medians; the script then
exits 1.

On a shared 2-core machine single runs of the same code spread by 20 % and more: judge a
change on several interleaved pairs, never on one run against another taken apart.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests
from flow_figures import (
    HERE,
    NoFigures,
    children_cpu,
    failure,
    flow_command,
    output_text,
    read_figures,
    run_group,
    subprocess_environment,
)

from imgtasks.demo import server_process


@dataclass(frozen=True)
class Side:
    label: str
    checkout: Path
    options: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    label: str
    wall_s: float
    cpu_s: float
    batches: int
    problem: str = ""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", type=Path, default=HERE, help="checkout of A (default: this one)")
    p.add_argument("--b", type=Path, default=HERE, help="checkout of B (default: this one)")
    p.add_argument("--a-options", default="", help="flows/run.py options of A")
    p.add_argument("--b-options", default="", help="flows/run.py options of B")
    p.add_argument("--count", type=int, default=3000, help="images per run")
    p.add_argument("--kind", default="web", choices=("web", "photos", "tiny"), help="corpus")
    p.add_argument("--latency", type=float, default=0.0, help="server latency, s")
    p.add_argument("--repeat", type=int, default=4, help="rounds of one A and one B run")
    args = p.parse_args(argv)
    for side in (args.a, args.b):
        if not (side / "flows" / "run.py").is_file():
            p.error(f"not a checkout of imgtasks (no flows/run.py): {side}")
    if args.count < 1 or args.repeat < 1:
        p.error("--count and --repeat must be >= 1")
    return args


def run_once(side: Side, urls: Path, work: Path, count: int) -> Run:
    out, figures = work / "out", work / "result.json"
    shutil.rmtree(out, ignore_errors=True)
    figures.unlink(missing_ok=True)
    cmd = flow_command(urls, out, figures, side.options, root=side.checkout)
    env = subprocess_environment(side.checkout)  # its bytecode written on the first call
    cpu, start = children_cpu(), time.perf_counter()
    try:
        # In its own checkout: the workers' fork server of a checkout older than the fix in
        # imgtasks/workerstart.py put the current directory first on its path.
        done = run_group(cmd, 600 + count, env, cwd=side.checkout)
    except subprocess.TimeoutExpired as exc:
        wall, cpu = time.perf_counter() - start, children_cpu() - cpu
        problem = failure(None, output_text(exc.stderr), f"after {exc.timeout:.0f} s")
        return Run(side.label, wall, cpu, 0, problem)
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu
    try:
        result = read_figures(figures)
    except NoFigures as exc:
        return Run(side.label, wall, cpu, 0, failure(done.returncode, done.stderr, str(exc)))
    ok, batches = int(result["ok"]), int(result.get("batches", 0))
    problem = "" if ok == count else f"{ok} of {count} ok"
    return Run(side.label, wall, cpu, batches, problem)


def summary(runs: list[Run], sides: tuple[Side, Side], count: int) -> list[str]:
    """Medians per side over its valid runs, and B against A."""
    lines, medians = [], {}
    for side in sides:
        valid = [r for r in runs if r.label == side.label and not r.problem]
        if not valid:
            lines.append(f"{side.label}: no valid run")
            continue
        wall = statistics.median(r.wall_s for r in valid)
        cpu = statistics.median(r.cpu_s for r in valid)
        medians[side.label] = (wall, cpu)
        lines.append(
            f"{side.label}: median {wall:.2f} s, {cpu:.2f} CPU-s "
            f"({cpu / count * 1e3:.2f} ms per image) over {len(valid)} runs"
        )
    if len(medians) == 2:
        (wall_a, cpu_a), (wall_b, cpu_b) = medians["A"], medians["B"]
        lines.append(f"B / A: wall x{wall_b / wall_a:.3f}, CPU x{cpu_b / cpu_a:.3f}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sides = (
        Side("A", args.a.resolve(), tuple(shlex.split(args.a_options))),
        Side("B", args.b.resolve(), tuple(shlex.split(args.b_options))),
    )
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp, server_process(args.latency, 0.0) as (base, _):
        work = Path(tmp)
        listing = requests.get(
            f"{base}/urls", params={"kind": args.kind, "count": args.count}, timeout=60
        )
        listing.raise_for_status()
        urls = work / "urls.txt"
        urls.write_text(listing.text)
        for i in range(args.repeat):
            for side in sides if i % 2 == 0 else sides[::-1]:
                run = run_once(side, urls, work, args.count)
                runs.append(run)
                note = f"  INVALID: {run.problem}" if run.problem else ""
                print(
                    f"round {i} {run.label}: {run.wall_s:6.2f} s {run.cpu_s:6.2f} CPU-s "
                    f"{run.batches} batches, load {os.getloadavg()[0]:.1f}{note}",
                    flush=True,
                )
    print("\n".join(summary(runs, sides, args.count)))
    return 1 if any(r.problem for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
