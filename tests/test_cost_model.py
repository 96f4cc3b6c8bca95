"""benchmarks/cost_model.py: the model's arithmetic on made-up measurements, and a --quick
run against a real scheduler and workers that prints every part of its table."""

from __future__ import annotations

import re
import subprocess
import sys

import cost_model  # benchmarks/cost_model.py (on sys.path: conftest)
import pytest
from conftest import ROOT, subprocess_environment


def run(batch_size: int, workers: int, us_per_url: float, us_per_task: float) -> cost_model.Run:
    urls = 1024 * batch_size
    batches = urls // batch_size
    return cost_model.Run(
        urls=urls,
        batch_size=batch_size,
        cpu_workers=workers,
        wall_s=1.0,
        client_cpu_s=us_per_url * urls / 1e6,
        scheduler_cpu_s=us_per_task * 2 * batches / 1e6,
    )


def measured() -> cost_model.Measured:
    """1 ms per task at 8 CPU workers, +10 us per extra worker; idle 1 % + 0.01 % per
    heartbeat/s (3 workers: 6 heartbeats/s, 9 workers: 18/s)."""
    return cost_model.Measured(
        batch_runs=[run(16, 8, 100.0, 1000.0), run(256, 8, 19.0, 1000.0)],
        worker_runs=[run(16, 2, 100.0, 940.0), run(16, 8, 100.0, 1000.0)],
        idle={2: 0.0106, 8: 0.0118},
        sweep_workers=8,
        images_per_core=80.0,
        images_note="made up",
    )


def test_fit_line_never_predicts_savings_from_more_workers() -> None:
    assert cost_model.fit_line([(2, 10.0), (8, 22.0)]) == pytest.approx((6.0, 2.0))
    assert cost_model.fit_line([(2, 10.0), (8, 4.0)]) == pytest.approx((7.0, 0.0))
    assert cost_model.fit_line([(4, 3.0)]) == (3.0, 0.0)


def test_scheduler_busy_grows_with_workers_and_shrinks_with_batch_size() -> None:
    model = cost_model.Model(measured(), node_cores=16)
    assert model.workers(10) == 170
    assert model.images_s(10) == 10 * 16 * 80
    # 170 workers (9 measured): 1000 + 10 x 161 us per task; 85 heartbeats/s
    assert model.task_s(16, 170) == pytest.approx(2610e-6)
    assert cost_model.heartbeats_s(170) == 85 and cost_model.heartbeats_s(1700) < 200
    idle = 0.01 + 0.0001 * 85
    tasks_s = 2 * 12_800 / 16
    assert model.busy(16, 10, 12_800) == pytest.approx(idle + tasks_s * 2610e-6)
    assert model.busy(256, 10, 12_800) < model.busy(16, 10, 12_800)
    assert model.recommend(10, 12_800) == 256  # batch 16 is 4.2 x busy
    assert model.recommend(1000, 1e7) is None


def test_goals_name_the_client_and_scheduler_verdicts() -> None:
    lines = cost_model.goals(cost_model.Model(measured(), node_cores=16))
    assert lines[1].startswith("goal: client path >= 50,000 URLs/s: met (best 52,632 URLs/s")
    assert "batch 256" in lines[1]
    assert re.match(r"goal: scheduler <= 50% busy at 50,000 URLs/s \(38 nodes", lines[2])


QUICK = ("--images-per-core", "80")  # the worker's run needs a local cluster: ~10 s more


@pytest.mark.timeout(180)
def test_quick_run_prints_the_measurements_the_prediction_and_the_goals() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cost_model.py"), "--quick", *QUICK],
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for heading in ("client: CPU per URL", "scheduler: CPU per task", "predicted ceiling"):
        assert heading in out
    prediction = out[out.index("predicted ceiling") :]
    for nodes in (10, 100):
        for batch in (16, 256):
            assert re.search(rf"^\s+{nodes}\s+{17 * nodes}\s+[\d,]+\s+{batch}\s", prediction, re.M)
    assert re.search(r"^goal: client path >= 50,000 URLs/s: (met|NOT met)", out, re.M)
    assert re.search(r"^goal: scheduler <= 50% busy at 50,000 URLs/s .*: (met|NOT met)", out, re.M)
