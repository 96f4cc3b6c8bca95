"""Benchmark: the adaptive per-host limit and the measured window, side by side in one run.

    python benchmarks/adaptive_bench.py                       # both scenarios (~3 min)
    python benchmarks/adaptive_bench.py --count 300 --hosts-count 2000
    python benchmarks/adaptive_bench.py --img2dataset ~/.venvs/img2dataset/bin/img2dataset

1. One host answering in 500 ms, ``--count`` web-size JPEGs (512 px, ~30 KB): ``flows/run.py``
   with its defaults (the adaptive per-host limit), with ``--per-host-fixed`` (16 per host,
   the cap of earlier versions), and img2dataset (2 processes x 32 threads) when it is
   installed; ratios printed.
2. ``--hosts`` hosts (127.0.0.1 and up) answering in 1 s: how busy the flow keeps the CPU
   pool (the thumbnail nodes' time over CPU slots x wall time after start-up).
3. The same hosts serving ``--photos-count`` large WebP photos (``--photo-side`` px, no
   draft decoding: ~20 ms of CPU each): where bandwidth allows the CPU pool to be the
   bottleneck, does the window keep it busy? On 2 cores, with web-size images (2.), the
   I/O worker, the server and the client take most of the cores however full the window.

The demo server (``python -m imgtasks.demo --hosts N --files-dir DIR``) runs as its own
process. Figures come from the flow's result JSON and manifest, the hosts' concurrency
from the server's ``/load`` (requests in flight at every arrival, as each host saw them);
``--html`` gets a bokeh chart of per-host concurrency over time. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import requests
from bench import Config, Row, flow_row, run_command, run_img2dataset, timed
from flow_figures import NoFigures, compile_project, flow_command, read_figures

from imgtasks.demo import server_process
from imgtasks.demo.cli import neighbour_addresses
from imgtasks.demo.corpus import photo_like

WEB_FILES = 64  # distinct images; each URL is unique (?i=N), so every one is fetched
WEB_SIDE = 512
PHOTO_FILES = 8
# (file name pattern, distinct files) of each corpus the server serves from --files-dir
WEB_CORPUS = ("w{}.jpg", WEB_FILES)
PHOTO_CORPUS = ("p{}.webp", PHOTO_FILES)
BIN_S = 0.25  # the chart's time step


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaptive_bench.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--count", type=int, default=1000, help="images from the one 500 ms host")
    p.add_argument("--latency", type=float, default=0.5, help="the one host's latency, s")
    p.add_argument("--hosts", type=int, default=16, help="hosts of the many-hosts scenario")
    p.add_argument("--hosts-count", type=int, default=3000, help="images over those hosts")
    p.add_argument("--hosts-latency", type=float, default=1.0, help="their latency, s")
    p.add_argument("--photos-count", type=int, default=600, help="photos over those hosts")
    p.add_argument("--photo-side", type=int, default=1600, help="the photos' longest side, px")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="CPU workers")
    p.add_argument("--img2dataset", metavar="PATH", help="img2dataset CLI (or on PATH)")
    p.add_argument("--skip", default="", help="comma list of: fixed, img2dataset, hosts, photos")
    p.add_argument("--out-dir", metavar="DIR", help="keep scratch outputs there")
    p.add_argument("--flow-options", default="", help="more flows/run.py options, one string")
    p.add_argument("--html", default="adaptive.html", help="bokeh chart of per-host concurrency")
    return p


@dataclass
class Run:
    row: Row
    figures: dict = field(default_factory=dict)
    load: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    written: tuple[float, float] | None = None  # first and last thumbnail file's mtime


def web_files(where: Path) -> None:
    """WEB_FILES photo-like JPEGs, longest side 512 px: what most of a real crawl is."""
    for i in range(WEB_FILES):
        image = photo_like(WEB_SIDE, WEB_SIDE * 3 // 4, seed=1000 + i)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=85)
        (where / f"w{i}.jpg").write_bytes(buf.getvalue())


def photo_files(where: Path, side: int) -> None:
    """PHOTO_FILES large WebP photos: decoded at full size (WebP has no draft mode)."""
    for i in range(PHOTO_FILES):
        image = photo_like(side, side * 3 // 4, seed=2000 + i)
        image.save(where / f"p{i}.webp", "WEBP", quality=80)


def url_list(
    base: str, hosts: int, count: int, path: Path, corpus: tuple[str, int] = WEB_CORPUS
) -> list[str]:
    parts = urlsplit(base)
    addresses = neighbour_addresses(parts.hostname or "127.0.0.1", hosts)
    name, files = corpus
    urls = [
        f"http://{addresses[i % hosts]}:{parts.port}/files/{name.format(i % files)}?i={i}"
        for i in range(count)
    ]
    path.write_text("\n".join(urls) + "\n")
    return [f"http://{a}:{parts.port}" for a in addresses]


class LoadWatch:
    """Each host's arrivals log (/load), cut at the end of the previous run."""

    def __init__(self, hosts: Sequence[str]) -> None:
        self.hosts = hosts
        self.seen: dict[str, float] = dict.fromkeys(hosts, float("-inf"))

    def since_last(self) -> dict[str, list[tuple[float, int]]]:
        logs = {}
        for host in self.hosts:
            log = requests.get(f"{host}/load", timeout=30).json()["log"]
            logs[host] = [(t, n) for t, n in log if t > self.seen[host]]
            if log:
                self.seen[host] = log[-1][0]
        return logs


def run_flow(name: str, urls: Path, work: Path, options: list[str], server, watch) -> Run:
    out, figures_file = work / name, work / f"{name}.json"
    cmd = flow_command(urls, out, figures_file, options)
    done, cost = timed(lambda: run_command(cmd, work / f"{name}.log", 1800), server)
    count = len(urls.read_text().split())
    row = flow_row(name, done, cost, out, figures_file, count)
    try:
        figures = read_figures(figures_file)
    except NoFigures:
        figures = {}
    return Run(row, figures, watch.since_last(), written_span(out))


def written_span(out: Path) -> tuple[float, float] | None:
    """When the first and the last thumbnail file of a run were written."""
    times = [p.stat().st_mtime for p in out.rglob("*.jpg") if p.parent != out]  # no sheet
    return (min(times), max(times)) if len(times) > 1 else None


def cpu_busy(run: Run, processes: int) -> float | None:
    """The thumbnail nodes' wall time over CPU slots x the run after start-up: the share
    of the time the CPU pool had a batch to work on (start-up ramp and final drain
    included). On a loaded machine a node's wall time grows with the load: say the load."""
    f = run.figures
    if not f:
        return None
    span = max(f["wall_s"] - f["startup_s"], 1e-9)
    return f.get("thumbnail_wall_s", f["thumbnail_s"]) / (processes * span)


def cpu_busy_flowing(run: Run, processes: int) -> float | None:
    """The same share over the span thumbnails were being written (first file to last):
    the CPU pool's use once images flow, without the first answers' latency and the
    polite ramp before them, which no window can shorten."""
    f = run.figures
    if not f or run.written is None:
        return None
    first, last = run.written
    work = f.get("thumbnail_wall_s", f["thumbnail_s"])
    return min(1.0, work / (processes * max(last - first, 1e-9)))


def machine_busy(run: Run) -> float | None:
    """CPU seconds of the flow's processes and of the demo server over cores x wall: on a
    small machine the server, the I/O worker and the client share the cores with the CPU
    pool, so once the cores are busy a fuller pool is not possible, whatever the window."""
    r = run.row
    if not r.seconds or r.cpu_s is None:
        return None
    return (r.cpu_s + (r.server_cpu_s or 0.0)) / ((os.cpu_count() or 1) * r.seconds)


def peaks(run: Run) -> str:
    return ", ".join(
        f"{urlsplit(h).hostname} {max((n for _, n in log), default=0)}"
        for h, log in run.load.items()
    )


def ratio(a: Run | None, b: Run | None) -> str:
    if a is None or b is None or not (a.row.valid and b.row.valid):
        return "n/a"
    return f"{b.row.seconds / a.row.seconds:.2f}x"


def line(run: Run) -> str:
    r = run.row
    state = "ok" if r.valid else f"INVALID ({r.outputs}/{r.expected}) {r.problem or r.note}"
    rate = r.expected / r.seconds if r.seconds else 0.0
    return f"  {r.method:<28}{r.seconds or 0:8.1f} s {rate:8.1f} img/s   {state}"


def one_host(args, work: Path, files: Path, skip: set[str]) -> list[Run]:
    extra = ("--files-dir", str(files))
    with server_process(args.latency, 0.02, *extra) as (base, pid):
        server = psutil.Process(pid)
        urls = work / "one-host.txt"
        hosts = url_list(base, 1, args.count, urls)
        watch = LoadWatch(hosts)
        common = ["--cpu-workers", str(args.processes), *shlex.split(args.flow_options)]
        runs = [run_flow("defaults (adaptive)", urls, work, common, server, watch)]
        if "fixed" not in skip:
            fixed = [*common, "--per-host-fixed"]
            runs.append(run_flow("--per-host-fixed (16)", urls, work, fixed, server, watch))
        if "img2dataset" not in skip:
            cfg = Config(args.count, args.latency, ("img2dataset",), args.processes,
                         32 * args.processes, args.img2dataset, None, Path(args.html))  # fmt: skip
            row = run_img2dataset(urls, work, cfg, server)
            row.method = f"img2dataset ({args.processes} x 32 threads)"
            runs.append(Run(row, {}, watch.since_last()))
    return runs


def many_hosts(
    args, work: Path, files: Path, corpus: tuple[str, int], count: int, title: str
) -> Run:
    extra = ("--files-dir", str(files), "--hosts", str(args.hosts))
    with server_process(args.hosts_latency, 0.05, *extra) as (base, pid):
        urls = work / f"{title.replace(' ', '-')}.txt"
        hosts = url_list(base, args.hosts, count, urls, corpus)
        options = ["--cpu-workers", str(args.processes), *shlex.split(args.flow_options)]
        return run_flow(title, urls, work, options, psutil.Process(pid), LoadWatch(hosts))


def print_many(run: Run, args, heading: str) -> None:
    print(f"\n{heading}")
    print(line(run))
    busy = cpu_busy(run, args.processes)
    shown = "n/a" if busy is None else f"{100 * busy:.0f} %"
    print(f"  CPU pool busy (thumbnail nodes' time / slots x wall after start-up): {shown}")
    flowing = cpu_busy_flowing(run, args.processes)
    shown = "n/a" if flowing is None else f"{100 * flowing:.0f} %"
    print(f"  CPU pool busy while thumbnails were written (first file to last): {shown}")
    cores = machine_busy(run)
    shown = "n/a" if cores is None else f"{100 * cores:.0f} %"
    print(f"  the machine's cores busy (flow and server CPU-s / cores x wall): {shown}")
    print(f"  hosts saw at most: {peaks(run)}")
    print(f"  load average at the end: {os.getloadavg()[0]:.1f}")


def write_chart(runs: Sequence[Run], path: Path) -> None:
    from bokeh.embed import file_html
    from bokeh.layouts import column
    from bokeh.palettes import Category20
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    plots = []
    for run in runs:
        if not run.load:
            continue
        p = figure(width=900, height=300, title=f"{run.row.method}: requests in flight per host")
        start = min((log[0][0] for log in run.load.values() if log), default=0.0)
        for i, (host, log) in enumerate(sorted(run.load.items())):
            bins: dict[int, int] = defaultdict(int)
            for t, n in log:
                key = int((t - start) / BIN_S)
                bins[key] = max(bins[key], n)
            xs = sorted(bins)
            p.step([x * BIN_S for x in xs], [bins[x] for x in xs], mode="after",
                   color=Category20[20][i % 20], legend_label=urlsplit(host).hostname)  # fmt: skip
        p.xaxis.axis_label = "seconds since the first request"
        p.yaxis.axis_label = "in flight (max per 0.25 s)"
        p.legend.visible = len(run.load) <= 8
        plots.append(p)
    path.write_text(file_html(column(*plots), INLINE, title="per-host concurrency"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    compile_project()
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="imgtasks-adaptive-") as tmp:
        work = Path(args.out_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = work / "files"
        files.mkdir(exist_ok=True)
        web_files(files)
        size = sum(f.stat().st_size for f in files.iterdir()) // WEB_FILES // 1000
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (other work "
              f"on the machine); web-size JPEGs ({WEB_SIDE} px, {size} KB avg)")  # fmt: skip
        runs = one_host(args, work, files, skip)
        print(f"\n1. {args.count} images, one host at {args.latency * 1000:.0f} ms")
        for run in runs:
            print(line(run) + (f"   host saw at most: {peaks(run)}" if run.load else ""))
        base = runs[0]
        for other in runs[1:]:
            print(f"  default vs {other.row.method}: {ratio(base, other)} faster")
        latency = f"{args.hosts_latency * 1000:.0f} ms"
        if "hosts" not in skip:
            many = many_hosts(args, work, files, WEB_CORPUS, args.hosts_count, "many hosts")
            runs.append(many)
            print_many(
                many, args, f"2. {args.hosts_count} images over {args.hosts} hosts at {latency}"
            )
        if "photos" not in skip:
            photo_files(files, args.photo_side)
            size = sum(f.stat().st_size for f in files.glob("p*.webp")) // PHOTO_FILES // 1000
            photos = many_hosts(
                args, work, files, PHOTO_CORPUS, args.photos_count, "many hosts photos"
            )
            runs.append(photos)
            print_many(photos, args, f"3. {args.photos_count} WebP photos ({args.photo_side} px, "
                       f"{size} KB avg) over {args.hosts} hosts at {latency}")  # fmt: skip
        write_chart(runs, Path(args.html))
        print(f"\nchart: {args.html}")
        (work / "figures.json").write_text(json.dumps([r.figures for r in runs]))
    return 0 if all(r.row.valid or r.row.seconds is None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
