"""benchmarks/bench.py: rows are checked, ratios and the CPU floor computed from the rows, the
flow's figures come from its result JSON and manifest (a run without them is INVALID, not a
crash), and a small real run on the demo server produces every row it asks for."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench  # benchmarks/bench.py (on sys.path: conftest)
import checkout_ab
import pandas as pd
import psutil
import pytest
import scale_bench
from conftest import ROOT, subprocess_environment

CFG = bench.parse_config(["--count", "100", "--processes", "2"])


def run_benchmark(
    script: str, args: list[str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """``benchmarks/SCRIPT`` as a command, with the tests' environment, output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def rows() -> list[bench.Row]:
    return [
        bench.Row("John serial download", "download", 40.0, 100, 100, cpu_s=4.0, server_cpu_s=1.0),
        bench.Row("threads(16) download", "download", 5.0, 100, 100, cpu_s=5.0, server_cpu_s=1.0),
        bench.Row("John serial resize", "resize", 10.0, 100, 100, cpu_s=10.0),
        bench.Row("Pool(2) resize", "resize", 6.0, 100, 100, cpu_s=11.0),
        bench.Row("dask hybrid", "total", 5.0, 100, 100, cpu_s=16.0),
        bench.Row("img2dataset", "total", 9.0, 97, 100, cpu_s=20.0),
    ]


def test_a_row_missing_outputs_is_invalid_and_gets_no_ratio() -> None:
    table = rows()
    report = bench.report(table + bench.combined_rows(table, 100), CFG, [])
    i2d = next(line for line in report.splitlines() if line.startswith("img2dataset "))
    assert "INVALID (97/100 outputs)" in i2d
    assert "Dask hybrid / img2dataset: n/a (invalid/skipped: img2dataset)" in report


def test_ratios_against_john_and_the_combined_rows() -> None:
    table = rows()
    combined = bench.combined_rows(table, 100)
    john = bench.find_row(combined, "John total")
    assert john is not None and john.seconds == 50.0 and john.cpu_s == 14.0
    mixed = bench.find_row(combined, "threads(16) + Pool(2)")
    assert mixed is not None and mixed.seconds == 11.0
    report = bench.report(table + combined, CFG, [])
    assert "Dask hybrid / John total: 10.00x (50.0 s / 5.0 s); goal >= 10x met" in report


def test_cpu_floor_uses_the_cheapest_download_and_resize() -> None:
    table = rows()
    line = bench.floor_line(table + bench.combined_rows(table, 100), CFG)
    # cheapest download: John's 4.0 + server 1.0; cheapest resize: John's 10.0; 2 processes
    assert line.startswith("CPU floor: download 4.0 + server 1.0 + resize 10.0 CPU-s")
    assert "= 7.5 s = 6.7x John at most" in line
    assert bench.floor_line(table[:2], CFG).endswith("n/a (needs a download row and a resize row)")


def test_web_rows_get_their_own_ratio_and_cpu_per_image() -> None:
    web = [
        bench.Row("web: dask hybrid", "web", 10.0, 1000, 1000, cpu_s=4.0),
        bench.Row("web: img2dataset", "web", 25.0, 1000, 1000, cpu_s=5.0),
    ]
    report = bench.report(rows() + web, CFG, [])
    assert "web-size: Dask hybrid / img2dataset: 2.50x (25.0 s / 10.0 s); goal >= 2x met" in report
    assert "dask hybrid 4.0 ms, img2dataset 5.0 ms; goal <= 3.5 ms" in report
    line = next(x for x in report.splitlines() if x.startswith("web: dask hybrid"))
    assert line.split()[3:7] == ["10.0", "100.0", "-", "-"]  # rate from its own N; no John
    assert "web-size CPU per image: n/a" in bench.report(rows(), CFG, [])


FIGURES = {"wall_s": 3.25, "startup_s": 1.5, "ok": 3, "entries": 3, "counts": {"ok": 3}}
COST = bench.Cost(wall=5.0, cpu=2.0, server_cpu=0.5)


def write_manifest(out: Path, statuses: list[str]) -> None:
    """A manifest whose ok rows point at thumbnail files that exist."""
    (out / "manifest").mkdir(parents=True)
    paths = [f"t/{i}.jpg" if s == "ok" else "" for i, s in enumerate(statuses)]
    for path in filter(None, paths):
        (out / path).parent.mkdir(exist_ok=True)
        (out / path).write_bytes(b"jpeg")
    frame = pd.DataFrame({"status": statuses, "path": paths})
    frame.to_parquet(out / "manifest" / "part-0.parquet")


def test_flow_row_takes_wall_and_startup_from_the_result_json(tmp_path: Path) -> None:
    write_manifest(tmp_path / "out", ["ok", "ok", "ok"])
    (tmp_path / "r.json").write_text(json.dumps(FIGURES))
    done = bench.Finished(0, "")
    row = bench.flow_row("dask hybrid", done, COST, tmp_path / "out", tmp_path / "r.json", 3)
    assert row.valid and (row.seconds, row.outputs) == (5.0, 3)
    assert (row.flow_s, row.startup_s) == (3.25, 1.5)
    assert row.note == "flow says 3.2 s; +1.8 s outside it; cluster start-up 1.5 s inside"


def test_flow_row_needs_both_the_json_and_the_manifest_to_count_an_output(tmp_path: Path) -> None:
    write_manifest(tmp_path / "out", ["ok", "ok", "http_4xx"])
    (tmp_path / "r.json").write_text(json.dumps(FIGURES))  # says 3 ok: the manifest has 2
    row = bench.flow_row(
        "dask hybrid", bench.Finished(0, ""), COST, tmp_path / "out", tmp_path / "r.json", 3
    )
    assert not row.valid and row.outputs == 2
    assert bench.status(row).startswith("INVALID (2/3 outputs) flow says 3.2 s")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "no result JSON"),
        ("{not json", "unreadable result JSON (JSONDecodeError)"),
        ('{"wall_s": 1.0, "ok": 3}', "result JSON lacks startup_s, entries"),
    ],
)
def test_a_flow_without_usable_figures_is_invalid_with_its_last_stderr_line(
    tmp_path: Path, content: str | None, why: str
) -> None:
    write_manifest(tmp_path / "out", ["ok", "ok", "ok"])  # whole outputs do not save it
    if content is not None:
        (tmp_path / "r.json").write_text(content)
    done = bench.Finished(1, "a warning\nrun.py: storage unavailable: disk full\n")
    row = bench.flow_row("dask hybrid", done, COST, tmp_path / "out", tmp_path / "r.json", 3)
    assert not row.valid and row.flow_s is None
    assert bench.status(row) == f"INVALID: exit 1: {why}; run.py: storage unavailable: disk full"
    assert bench.speedup(row, row) == "-"


@pytest.mark.timeout(120)
def test_scale_bench_marks_a_failed_run_invalid_instead_of_crashing(tmp_path: Path) -> None:
    me = psutil.Process(os.getpid())
    result = scale_bench.run_flow(tmp_path / "missing.txt", 10, 16, 0.2, me)
    assert not result.valid
    assert result.problem.startswith("exit 2: no result JSON; run.py: error: --urls")


@pytest.mark.timeout(120)
def test_scale_bench_reads_the_peak_of_a_process_last_moment_from_its_exit() -> None:
    """A process whose peak comes just before it exits, as the flow's does (its contact
    sheet): reap() reads the peak from the ended process, and its exit code."""
    code = "import sys; held = b'x' * (200 << 20); sys.exit(3)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while (peak := scale_bench.reap(proc)) is None:
        assert time.monotonic() < deadline, "the process did not end"
        time.sleep(0.05)
    assert proc.returncode == 3
    assert peak >= 200 * scale_bench.MIB


def test_scale_bench_reads_each_process_growth_after_warm_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client rising 0.01 MiB a second and a flat I/O worker, sampled every 50 s of a
    1,000 s run of 7,000 URLs: the client grew 7 MiB from 200 s to 900 s, over 4,900 URLs.
    In a 100 s run, no growth is read: its first fifth is still start-up."""
    mib = scale_bench.MIB
    ticks = range(0, 1000, 50)
    client = scale_bench.Sample(levels=[(t, int((100 + t / 100) * mib)) for t in ticks])
    io = scale_bench.Sample(levels=[(t, 50 * mib) for t in ticks])
    run = scale_bench.Result(
        count=7000, batch_size=16, wall=1000.0, flow_wall=999.0, startup=1.0, batches=438,
        rows=7000, ok=7000, client=client, workers=[io],
    )  # fmt: skip
    scale_bench.print_levels(run)
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert lines["client"].endswith("+7.0 MiB (+1498.0 B/URL)")
    assert lines["client"].split()[1:3] == ["101.0", "102.0"]  # at 10 % and 20 % of the run
    assert lines["io"].endswith("+0.0 MiB (+0.0 B/URL)")
    scale_bench.write_trace([run], tmp_path / "trace.csv")
    rows = (tmp_path / "trace.csv").read_text().splitlines()
    assert rows[0] == "urls,process,seconds,rss_mib" and len(rows) == 1 + 2 * len(ticks)
    assert rows[1:3] == ["7000,client,0.0,100.0", "7000,client,50.0,100.5"]
    scale_bench.print_levels(dataclasses.replace(run, wall=100.0))
    short = [line for line in capsys.readouterr().out.splitlines() if line]
    assert short[-3].split()[-1] == "-" and "no growth read" in short[-1]


REAL_RUN_ROWS = (
    "John serial download",
    "threads(32) download",
    "John serial resize",
    "Pool(1) resize",
    "dask threads",
    "web: dask hybrid",
    "John total",
)


@pytest.mark.timeout(300)
def test_small_real_run_measures_every_method_it_can(tmp_path: Path) -> None:
    env = subprocess_environment()
    env.pop(bench.I2D_ENV, None)
    env["PATH"] = str(Path(sys.executable).parent)  # no img2dataset on it
    html, work = tmp_path / "bench.html", tmp_path / "work"
    methods = "john,threads,pool,dask-threads,img2dataset,web-hybrid"
    proc = subprocess.run(
        [
            *(sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--count", "12"),
            *("--latency", "0", "--methods", methods, "--processes", "1", "--html", str(html)),
            *("--out-dir", str(work), "--web-count", "12"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("method "))) :]
    for method in REAL_RUN_ROWS:
        row = next(x for x in table if x.startswith(method))
        assert "  ok" in row and "INVALID" not in row, row
    i2d = next(x for x in table if x.startswith("img2dataset"))
    assert "SKIPPED: img2dataset not found" in i2d and "pip install img2dataset" in i2d
    # the flow's row shows its result JSON's numbers
    figures = json.loads((work / "dask-threads.json").read_text())
    dask = next(x for x in table if x.startswith("dask threads"))
    assert f"flow says {figures['wall_s']:.1f} s;" in dask, dask
    assert f"cluster start-up {figures['startup_s']:.1f} s inside" in dask, dask
    assert "CPU floor: download" in proc.stdout
    assert html.stat().st_size > 10_000


@pytest.mark.timeout(240)
def test_flow_cpu_ab_shows_dask_malloc_trim_costs_page_faults(tmp_path: Path) -> None:
    proc = run_benchmark(
        "flow_cpu.py",
        [
            *("--count", "60", "--latency", "0", "--ab", "dask-malloc-trim", "--"),
            *("--cpu-workers", "1", "--io-threads", "4", "--dashboard-address", "127.0.0.1:0"),
        ],
        tmp_path,
        timeout=220,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = proc.stdout.split("run 1, ")[1:]
    assert [r.split(":")[0] for r in runs] == ["ours", "dask-malloc-trim"]
    faults = {}
    for r in runs:
        assert "60/60 ok" in r, r
        line = next(x for x in r.splitlines() if x.strip().startswith("worker cpu"))
        faults[r.split(":")[0]] = int(line.split("CPU-s")[1].split()[0].replace(",", ""))
    # Dask's MALLOC_TRIM_THRESHOLD_ makes every image buffer a fresh mmap (imgtasks.cluster)
    assert faults["dask-malloc-trim"] > 1.3 * faults["ours"], faults


@pytest.mark.timeout(200)
def test_cpu_breakdown_names_where_the_cpu_went(tmp_path: Path) -> None:
    proc = run_benchmark(
        "cpu_breakdown.py",
        ["--count", "40", "--alone", "16", "--", "--cpu-workers", "1", "--io-threads", "4"],
        tmp_path,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "40/40 ok" in out
    for where in ("client + scheduler", "worker io", "worker cpu", "demo server"):
        assert f"  {where}" in out, where
    counters = {
        line.split()[0]: int(line.rsplit("(", 1)[1].split()[0])
        for line in out.splitlines()
        if line.startswith("        ") and line.rstrip().endswith("calls)")
    }
    # the nodes' own counters, read from inside the workers: one fetch and one thumbnail
    # per image, one manifest part per batch of 16
    assert counters["fetch"] == 40 and counters["make_thumbnail"] == 40, counters
    assert counters["manifest"] == 3, counters
    assert "event loop (comms" in out and "task threads (node code)" in out
    assert "CPU per image, client + workers, the run:" in out
    assert "stages alone (16 images, here): fetch" in out


def test_checkout_ab_medians_leave_invalid_runs_out() -> None:
    a, b = checkout_ab.Side("A", ROOT, ()), checkout_ab.Side("B", ROOT, ())
    runs = [
        checkout_ab.Run("A", 10.0, 20.0, 5),
        checkout_ab.Run("A", 12.0, 24.0, 5),
        checkout_ab.Run("B", 8.0, 15.0, 3),
        checkout_ab.Run("B", 1.0, 1.0, 1, problem="7 of 100 ok"),
    ]
    lines = checkout_ab.summary(runs, (a, b), 100)
    assert lines[0] == "A: median 11.00 s, 22.00 CPU-s (220.00 ms per image) over 2 runs"
    assert lines[1] == "B: median 8.00 s, 15.00 CPU-s (150.00 ms per image) over 1 runs"
    assert lines[2] == "B / A: wall x0.727, CPU x0.682"


def test_checkout_ab_counts_a_run_that_times_out_as_invalid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run still going at its time-out is an INVALID row saying so, not a traceback."""

    def too_slow(cmd: list[str], timeout: float, *args: Any, **kwargs: Any) -> None:
        raise subprocess.TimeoutExpired(cmd, timeout, stderr=b"run.py: last words\n")

    monkeypatch.setattr(checkout_ab, "run_group", too_slow)
    side = checkout_ab.Side("A", ROOT, ())
    run = checkout_ab.run_once(side, tmp_path / "urls.txt", tmp_path, 10)
    assert run.problem == "timed out: after 610 s; run.py: last words", run
    assert run.label == "A" and run.batches == 0


@pytest.mark.timeout(200)
def test_checkout_ab_runs_both_sides_with_their_options(tmp_path: Path) -> None:
    proc = run_benchmark(
        "checkout_ab.py",
        [
            *("--count", "12", "--kind", "tiny", "--repeat", "1"),
            *("--b-options", "--batch-size 4"),
            *("--a-options", "--dashboard-address 127.0.0.1:0 --no-job-page"),
        ],
        tmp_path,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = [x for x in proc.stdout.splitlines() if x.startswith("round 0 ")]
    assert [x.split(":")[0] for x in rounds] == ["round 0 A", "round 0 B"]
    assert "1 batches" in rounds[0] and "3 batches" in rounds[1], rounds  # B's --batch-size 4
    assert "B / A: wall x" in proc.stdout


def test_checkout_ab_refuses_a_directory_that_is_no_checkout(tmp_path: Path) -> None:
    proc = run_benchmark("checkout_ab.py", ["--a", str(tmp_path)], tmp_path, timeout=60)
    assert proc.returncode == 2
    assert f"not a checkout of imgtasks (no flows/run.py): {tmp_path}" in proc.stderr


def test_a_timed_out_run_takes_its_whole_process_group_with_it(tmp_path: Path) -> None:
    """What the flow started (its fork server, its workers) goes with it on a time-out."""
    from flow_figures import output_text, run_group

    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); print('started', flush=True); "
        "time.sleep(60)"
    )
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_group([sys.executable, "-c", code], timeout=5)
    assert "started" in output_text(caught.value.stdout)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the command's child outlived the time-out"
        time.sleep(0.05)
    done = run_group([sys.executable, "-c", "print('out'); import sys; sys.exit(3)"], timeout=30)
    assert (done.returncode, done.stdout) == (3, "out\n")
