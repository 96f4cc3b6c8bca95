"""benchmarks/bench.py: rows are checked, ratios and the CPU floor computed from the rows, and a
small real run on the demo server produces every row it asks for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_environment

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench

CFG = bench.parse_config(["--count", "100", "--processes", "2"])


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


REAL_RUN_ROWS = (
    "John serial download",
    "threads(32) download",
    "John serial resize",
    "Pool(1) resize",
    "dask threads",
    "John total",
)


@pytest.mark.timeout(300)
def test_small_real_run_measures_every_method_it_can(tmp_path: Path) -> None:
    env = subprocess_environment()
    env.pop(bench.I2D_ENV, None)
    env["PATH"] = str(Path(sys.executable).parent)  # no img2dataset on it
    html = tmp_path / "bench.html"
    methods = "john,threads,pool,dask-threads,img2dataset"
    proc = subprocess.run(
        [
            *(sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--count", "12"),
            *("--latency", "0", "--methods", methods, "--processes", "1", "--html", str(html)),
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
    assert "CPU floor: download" in proc.stdout
    assert html.stat().st_size > 10_000


@pytest.mark.timeout(240)
def test_flow_cpu_ab_shows_dask_malloc_trim_costs_page_faults(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, str(ROOT / "benchmarks" / "flow_cpu.py"), "--count", "60"),
            *("--latency", "0", "--ab", "dask-malloc-trim", "--", "--cpu-workers", "1"),
            *("--io-threads", "4", "--dashboard-address", "127.0.0.1:0"),
        ],
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=220,
        cwd=tmp_path,
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
