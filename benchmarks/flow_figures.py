"""What a ``flows/run.py`` subprocess did, for the benchmarks: its figures from the
``--result-json`` file it writes (``imgtasks.Result.to_dict()``) and its outputs from the
manifest, never from its printed text. Its stderr only explains a run that left no figures.
"""

from __future__ import annotations

import compileall
import functools
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]  # this checkout
# The keys the benchmarks read; a file without them is as good as none.
FIGURES = ("wall_s", "startup_s", "ok", "entries")


def subprocess_environment(root: Path = HERE) -> dict[str, str]:
    """Environment for the processes a benchmark starts: the project of checkout ``root``
    importable (its modules compiled first), no proxies (every request goes to loopback)."""
    compile_project(root)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env.pop(var, None)
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


@functools.cache
def compile_project(root: Path = HERE) -> None:
    """Write the bytecode of a checkout's (default: this one's) ``imgtasks/`` and
    ``flows/``, as pip does for an installed package (img2dataset's included). The project
    is installed editable, and where PYTHONDONTWRITEBYTECODE is set (as on our machines)
    every process of every run would compile our modules from source again, in the client
    and in the workers' fork server (``python -X importtime``, 2026-12-01: our modules' own
    import time in the client 240 ms instead of 105)."""
    for package in ("imgtasks", "flows"):
        compileall.compile_dir(root / package, quiet=1)


def children_cpu() -> float:
    """CPU-seconds (user + system) of every process this one has waited for, and of
    theirs: a flow subprocess's whole tree (client, scheduler, workers) once it exits."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


class NoFigures(Exception):
    """The run left no usable ``--result-json`` file; the message says what was wrong."""


def flow_command(
    urls: Path, out: Path, figures_file: Path, options: Sequence[str] = (), root: Path = HERE
) -> list[str]:
    """``python flows/run.py`` (checkout ``root``'s) on a URL list, its figures written
    to ``figures_file``."""
    return [
        *(sys.executable, str(root / "flows" / "run.py"), "--urls", str(urls), "--out", str(out)),
        *("--result-json", str(figures_file), "--no-progress", *options),
    ]


def read_figures(path: Path) -> dict[str, Any]:
    """The run's ``Result.to_dict()``; NoFigures if the file is missing, unreadable or
    lacks a number the benchmarks need."""
    try:
        figures = json.loads(path.read_text())
    except FileNotFoundError:
        raise NoFigures("no result JSON") from None
    except (OSError, ValueError) as exc:
        raise NoFigures(f"unreadable result JSON ({type(exc).__name__})") from None
    if not isinstance(figures, dict):
        raise NoFigures("result JSON is not an object")
    missing = [k for k in FIGURES if not isinstance(figures.get(k), int | float)]
    if missing:
        raise NoFigures(f"result JSON lacks {', '.join(missing)}")
    return figures


def run_group(
    cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=...)``, the command in
    a process group of its own. On a time-out (``TimeoutExpired``, with what it printed so
    far) or an interrupt the whole group is killed: the flow's fork server and workers
    too, which ``subprocess.run`` leaves running until they notice the flow is gone."""
    pipe, group = subprocess.PIPE, {"start_new_session": True}
    proc = subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True, env=env, cwd=cwd, **group)
    with proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:  # TimeoutExpired, KeyboardInterrupt
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def output_text(output: str | bytes | None) -> str:
    """What a process printed, as text: ``TimeoutExpired`` keeps it as bytes (or None)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1].strip()[:120] if lines else ""


def failure(returncode: int | None, stderr: str, problem: str = "") -> str:
    """One line on a run that failed: how it ended, what is missing, its last stderr line
    (None: timed out)."""
    how = "timed out" if returncode is None else f"exit {returncode}"
    detail = "; ".join(filter(None, (problem, last_line(stderr))))
    return f"{how}: {detail}" if detail else how


@dataclass(frozen=True)
class ManifestCount:
    rows: int
    ok: int  # status ok with the thumbnail file present


def manifest_count(out: Path) -> ManifestCount:
    """The manifest under a local ``out``: its rows, and its ok rows whose file exists."""
    import pandas as pd

    manifest = out / "manifest"
    if not manifest.exists():
        return ManifestCount(0, 0)
    frame = pd.read_parquet(manifest, columns=["status", "path"])
    ok_paths = frame.loc[frame["status"] == "ok", "path"]
    return ManifestCount(len(frame), sum((out / p).is_file() for p in ok_paths))
