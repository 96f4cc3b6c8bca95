"""examples/seed_exercise.ipynb runs top to bottom in a real Jupyter kernel: every method
makes all COUNT thumbnails, and the timing table and the bokeh chart are shown."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_environment

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("jupyter_client.kernelspec")

NOTEBOOK = ROOT / "examples" / "seed_exercise.ipynb"
COUNT = 24
PARAMETERS = f"COUNT = {COUNT}\nLATENCY = 0.02\n"  # papermill-style: after the notebook's own
METHODS = ("John: serial", "32 threads, then", "imgtasks on Dask (hybrid)")
BOKEH_EXEC = "application/vnd.bokehjs_exec.v0+json"
# Appended to the notebook: what it computed, for the test to read.
PROBE = """\
import json
print(json.dumps({
    "table": table.to_dict("records"),
    "counts": dict(result.counts),
    "imgtasks": imgtasks.__file__,
    "exercise": exercise.__file__,
}))"""


def python3_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a Python kernel this interpreter runs (installed for the test if none)."""
    if "python3" not in kernelspec.find_kernel_specs():
        from ipykernel.kernelspec import install

        install(prefix=str(tmp_path / "jupyter"))
        monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    return "python3"


def with_parameters(nb: nbformat.NotebookNode, source: str) -> None:
    """Insert ``source`` as a cell after the cell tagged ``parameters``, as papermill does."""
    at = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(at + 1, cell)


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def test_the_notebook_is_stored_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.timeout(240)
def test_the_notebook_runs_every_method_to_count_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with_parameters(nb, PARAMETERS)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    env = subprocess_environment()  # the kernel imports this checkout's imgtasks
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "examples"), env["PYTHONPATH"]])
    client = nbclient.NotebookClient(
        nb,
        timeout=180,
        kernel_name=python3_kernel(tmp_path, monkeypatch),
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute(env=env)

    shown = outputs(nb)
    assert not [out for out in shown if out.output_type == "error"]
    probe = json.loads(nb.cells[-1].outputs[-1].text)
    assert Path(probe["imgtasks"]).is_relative_to(ROOT)
    assert Path(probe["exercise"]).is_relative_to(ROOT / "examples")

    table = probe["table"]
    assert len(table) == len(METHODS)
    for method, row in zip(METHODS, table, strict=True):
        assert row["method"].startswith(method)
        assert row["outputs"] == COUNT, row
        assert row["seconds"] > 0 and row["images/s"] > 0
    assert table[0]["speed-up vs John"] == 1.0
    assert probe["counts"] == {"ok": COUNT}

    html = [out.data["text/html"] for out in shown if "text/html" in out.get("data", {})]
    assert any(all(row["method"] in page for row in table) for page in html), "no table shown"
    assert any(BOKEH_EXEC in out.get("data", {}) for out in shown), "no bokeh chart shown"
    printed = "".join(out.text for out in shown if out.output_type == "stream")
    assert "dashboard: http://127.0.0.1:" in printed
    # The notebook's default WORK is relative: its outputs went under the kernel's cwd.
    assert (tmp_path / "seed_exercise_outputs" / "imgtasks" / "manifest").is_dir()
