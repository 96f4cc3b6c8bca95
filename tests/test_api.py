"""``imgtasks.thumbnails`` as a notebook calls it: with the user's own client, or none."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pytest
from conftest import run_python
from distributed import Client, LocalCluster

import imgtasks
from imgtasks import api, window
from imgtasks.cluster import ClusterSettings


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """A user's own cluster: plain LocalCluster processes, no io/cpu resources."""
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=4,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            processes=True,
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def input_lines(demo_server, n: int = 23) -> list[object]:
    """URLs with the odd line in them: a repeat, a non-URL, a 404, a missing value."""
    urls: list[object] = list(demo_server.urls(n))
    urls[3] = urls[1]
    urls[7] = "not a url"
    urls[11] = f"{demo_server.base_url}/status/404"
    urls[13] = None
    return urls


def check_rows(result: imgtasks.Result, lines: list[object]) -> pd.DataFrame:
    df = result.manifest().sort_values("index").reset_index(drop=True)
    assert list(df["index"]) == list(range(len(lines)))
    assert list(df["url"]) == [u if isinstance(u, str) else "" for u in lines]
    assert result.entries == len(lines) == sum(result.counts.values())
    assert result.counts == {"ok": len(lines) - 4, "duplicate": 1, "invalid_url": 2, "http_4xx": 1}
    assert dict(df["status"].value_counts()) == result.counts
    for path in df[df["status"] == "ok"]["path"]:
        assert (Path(result.out) / path).is_file()
    return df


def test_with_the_users_client_and_a_list(tmp_path: Path, demo_server, client: Client) -> None:
    lines = input_lines(demo_server)
    result = imgtasks.thumbnails(lines, tmp_path / "out", client=client, progress=False)
    check_rows(result, lines)
    assert client.status == "running"  # a user's client is never closed
    assert result.dashboard_link == client.dashboard_link
    assert not result.failed_batches and not result.interrupted
    assert result.images_per_s > 0 and result.wall_s > 0


def test_with_a_pandas_dataframe_and_its_column(
    tmp_path: Path, demo_server, client: Client
) -> None:
    lines = input_lines(demo_server)
    frame = pd.DataFrame({"caption": [f"c{i}" for i in range(len(lines))], "link": lines})
    result = imgtasks.thumbnails(
        frame, tmp_path / "out", client=client, url_column="link", size=(64, 48), progress=False
    )
    df = check_rows(result, lines)
    ok = df[df["status"] == "ok"]
    assert (ok["width"] <= 64).all() and (ok["height"] <= 48).all()


def test_with_a_dask_dataframe_read_partition_by_partition(
    tmp_path: Path, demo_server, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = input_lines(demo_server, 31)
    frame = dd.from_pandas(pd.DataFrame({"url": lines}), npartitions=4)
    computed = []
    real = pd.Series.tolist

    def tolist(series: pd.Series) -> list:  # what reaches the client, one call per partition
        computed.append(len(series))
        return real(series)

    monkeypatch.setattr(pd.Series, "tolist", tolist)
    # read_on="client": the partitions come to the client one at a time (the default on a
    # distributed cluster has the workers read them: tests/test_cluster_input.py)
    result = imgtasks.thumbnails(
        frame, tmp_path / "out", client=client, progress=False, read_on="client"
    )
    monkeypatch.undo()
    assert computed and max(computed) < len(lines) and sum(computed) == len(lines)
    check_rows(result, lines)


def test_the_default_client_is_used_when_none_is_given(
    tmp_path: Path, demo_server, client: Client
) -> None:
    lines = input_lines(demo_server)
    with client.as_current():
        result = imgtasks.thumbnails(lines, tmp_path / "out", progress=False)
    check_rows(result, lines)
    assert result.dashboard_link == client.dashboard_link


def test_without_a_client_the_hybrid_cluster_is_started_and_closed(
    tmp_path: Path, demo_server
) -> None:
    """In a fresh interpreter (no default client there): the hybrid cluster of the CLI."""
    lines = input_lines(demo_server, 16)
    listing = tmp_path / "urls.parquet"
    pd.DataFrame({"url": lines}).to_parquet(listing)
    script = f"""
import logging, threading
import imgtasks
from distributed import default_client
logging.basicConfig(level=logging.INFO)
cluster = imgtasks.ClusterSettings(cpu_workers=1, io_threads=4, dashboard_address="127.0.0.1:0")
result = imgtasks.thumbnails({str(listing)!r}, {str(tmp_path / "out")!r}, cluster=cluster,
                             progress=False)
print("COUNTS", sorted(result.counts.items()))
print("LINK", result.dashboard_link)
try:
    default_client()
    print("CLIENT LEFT OPEN")
except ValueError:
    print("CLIENT CLOSED")
"""
    proc = run_python(script, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "COUNTS [('duplicate', 1), ('http_4xx', 1), ('invalid_url', 2), ('ok', 12)]" in (
        proc.stdout
    )
    assert "LINK http://127.0.0.1:" in proc.stdout
    assert "CLIENT CLOSED" in proc.stdout
    assert "dashboard: http://127.0.0.1:" in proc.stderr  # logged, not printed
    df = pd.read_parquet(tmp_path / "out" / "manifest")
    assert sorted(df["index"]) == list(range(len(lines)))


def test_sync_mode_runs_in_this_thread(tmp_path: Path, demo_server) -> None:
    lines = input_lines(demo_server, 15)
    result = imgtasks.thumbnails(
        iter(lines), tmp_path / "out", cluster="sync", batch_size=4, progress=False
    )
    check_rows(result, lines)
    assert result.dashboard_link is None and result.total is None


def test_the_library_logs_and_never_prints(
    tmp_path: Path, demo_server, client: Client, capsys, caplog
) -> None:
    with caplog.at_level(logging.INFO, logger="imgtasks"):
        imgtasks.thumbnails(demo_server.urls(5), tmp_path / "out", client=client, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    said = [r.getMessage() for r in caplog.records if r.name == "imgtasks.run"]
    assert any(m.startswith("outputs: ") for m in said), said


def test_a_progress_bar_counts_every_line(tmp_path: Path, demo_server, client: Client, capsys):
    imgtasks.thumbnails(demo_server.urls(10), tmp_path / "out", client=client, progress=True)
    err = capsys.readouterr().err
    assert "10/10" in err and "img" in err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"urls": 42}, "urls must be a path"),
        ({"urls": pd.DataFrame({"u": ["x"]})}, "column 'url' not in the DataFrame"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"window": -1}, "window must be >= 0"),
        ({"size": (0, 5)}, "thumbnail size"),
        ({"mode": "stretch"}, "mode must be one of"),
        ({"thumb": imgtasks.ThumbSettings(), "size": (5, 5)}, "give thumb= or size, not both"),
        ({"cluster": "nonsense"}, "scheduler must be one of"),
    ],
)
def test_bad_arguments_raise_before_any_work(tmp_path: Path, kwargs: dict, message: str) -> None:
    kwargs = {"urls": ["http://127.0.0.1:9/x.jpg"], **kwargs}
    with pytest.raises(ValueError, match=message):
        imgtasks.thumbnails(out=tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out" / "manifest").exists()


def test_setup_problems_are_one_line_setup_errors_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(imgtasks.SetupError, match="no such file") as missing:
        imgtasks.thumbnails(tmp_path / "nonexistent.txt", tmp_path / "out", progress=False)
    assert missing.value.exit_code == 2
    with pytest.raises(imgtasks.SetupError, match="is an existing file"):
        imgtasks.thumbnails(["http://127.0.0.1:9/x"], tmp_path / "file", progress=False)


def test_interrupting_keeps_finished_batches_and_resume_finishes(
    tmp_path: Path, demo_server, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt after the first finished batch (as the notebook's stop button
    raises one): Interrupted carries the result; resume=True does only the rest."""
    from imgtasks import flow

    urls = demo_server.urls(40)
    real = flow.Progress.batch_done

    def stop_after_first(self, report, tally) -> None:
        real(self, report, tally)
        raise KeyboardInterrupt

    monkeypatch.setattr(flow.Progress, "batch_done", stop_after_first)
    out = tmp_path / "out"
    with pytest.raises(imgtasks.Interrupted) as stopped:
        imgtasks.thumbnails(urls, out, client=client, batch_size=4, window=2, progress=False)
    first = stopped.value.result
    assert first.interrupted and 0 < first.entries < len(urls)
    monkeypatch.undo()
    result = imgtasks.thumbnails(
        urls, out, client=client, batch_size=4, resume=True, progress=False
    )
    assert result.resumed >= first.ok and result.counts == {"ok": len(urls)}
    df = result.manifest()
    assert sorted(df["url"]) == sorted(urls) and (df["status"] == "ok").all()


def test_every_argument_is_documented() -> None:
    import inspect

    doc = imgtasks.thumbnails.__doc__ or ""
    for name in inspect.signature(imgtasks.thumbnails).parameters:
        assert f"    {name}: " in doc, name


def test_import_imgtasks_stays_light() -> None:
    code = "import sys, imgtasks; print('dask' in sys.modules, 'distributed' in sys.modules)"
    proc = run_python(code)
    assert proc.stdout.split() == ["False", "False"], proc.stderr


def test_cluster_settings_from_the_api_match_the_cli_defaults() -> None:
    assert ClusterSettings().kind == "hybrid"


def test_batch_sizes_grow_as_batches_come_back(
    tmp_path: Path, demo_server, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default batch size is measured: 16 URLs at first, more once cheap batches come
    back (tiny images: ~1 ms of thumbnail CPU each, so up to the ceiling of 128). The
    target is 2 s of work per batch instead of 0.25 s: on a machine loaded 5x a tiny
    image once took 16 ms of wall time, when sizes followed wall time, and no batch grew;
    sized by CPU they should grow anyway, and the growth, not the target, is tested here."""
    monkeypatch.setattr(api, "BatchSizing", functools.partial(window.BatchSizing, target_s=2.0))
    urls = [f"{demo_server.base_url}/tiny/{i}.jpg" for i in range(1200)]
    result = imgtasks.thumbnails(urls, tmp_path / "auto", client=client, progress=False)
    assert result.ok == 1200
    assert 16 < result.largest_batch <= 128 and result.batches < 1200 / 16
    fixed = imgtasks.thumbnails(
        urls[:100], tmp_path / "fixed", client=client, batch_size=16, progress=False
    )
    assert (fixed.batches, fixed.largest_batch) == (7, 16)
