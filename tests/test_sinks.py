from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import pytest
from fsspec.implementations.local import LocalFileSystem

from imgtasks import sinks
from imgtasks.manifest import Record, manifest_parts, read_manifest, write_manifest_part
from imgtasks.sinks import (
    OutputSettings,
    file_exists,
    output_relpath,
    sweep_temporaries,
    write_atomic,
    write_file,
)

CLIMBERS = [
    "http://h/..%2F..%2F..%2Fetc%2Fpasswd",
    "http://h/../../../../tmp/x.jpg",
    "http://h/img.jpg?name=../../x",
    "http://h/%2e%2e/%2e%2e/x.jpg",
    "http://h/\u00fcnic\u00f8de/\u732b.jpg",
    "http://h/" + "/".join([".."] * 50),
]


def test_names_are_stable_fanned_out_hashes() -> None:
    a = output_relpath("http://h/a.jpg", "jpg")
    assert a == output_relpath("http://h/a.jpg", "jpg")
    assert a != output_relpath("http://h/b.jpg", "jpg")
    directory, name = a.split("/")  # 256 directories, named by the hash's first byte
    assert len(directory) == 2
    assert name.startswith(directory) and name.endswith(".jpg") and len(name) == 64 + 4


@pytest.mark.parametrize("url", CLIMBERS)
def test_no_url_writes_outside_the_output(tmp_path: Path, url: str) -> None:
    out = tmp_path / "out"
    settings = OutputSettings(str(out))
    relpath = output_relpath(url, "jpg")
    write_file(settings, relpath, b"x")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [out / relpath]
    assert (out / relpath).resolve().is_relative_to(out.resolve())


def test_atomic_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fsspec

    fs = fsspec.filesystem("file")
    target = tmp_path / "d" / "f.bin"
    write_atomic(fs, str(target), b"first")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(fs, str(target), b"second version")
    monkeypatch.undo()
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]  # temp file removed


def test_manifest_round_trip_with_pandas(tmp_path: Path) -> None:
    settings = OutputSettings(str(tmp_path))
    rows = [
        Record(0, "http://h/a.jpg", "ok", path="ab/cd/x.jpg", width=128, height=96, bytes=10),
        Record(1, "http://h/b.jpg", "http_4xx", "HTTP 404 Not Found", http_status=404),
    ]
    write_manifest_part(settings, "run1", 0, rows[:1])
    write_manifest_part(settings, "run1", 1, rows[1:])
    assert manifest_parts(settings) == [
        "manifest/part-run1-00000000.parquet",
        "manifest/part-run1-00000001.parquet",
    ]
    df = pd.read_parquet(tmp_path / "manifest")
    assert list(df["url"]) == ["http://h/a.jpg", "http://h/b.jpg"]
    assert list(df["status"]) == ["ok", "http_4xx"]
    assert df.loc[1, "http_status"] == 404
    assert read_manifest(settings).num_rows == 2


def test_memory_filesystem_outputs() -> None:
    settings = OutputSettings("memory://sinks-test/out")
    write_file(settings, "ab/cd/x.jpg", b"data")
    assert file_exists(settings, "ab/cd/x.jpg")
    assert not file_exists(settings, "ab/cd/y.jpg")
    write_manifest_part(settings, "r", 3, [Record(0, "http://h/x", "ok")])
    assert read_manifest(settings).column("url").to_pylist() == ["http://h/x"]


def test_empty_manifest_reads_as_empty_table(tmp_path: Path) -> None:
    assert read_manifest(OutputSettings(str(tmp_path))).num_rows == 0


def test_sweep_removes_a_dead_writers_temporaries_at_once(tmp_path: Path) -> None:
    """A temporary written here by a process that has exited goes whatever its age; one
    of a live process, or of another machine, stays until it is stale."""
    import subprocess
    import sys

    from imgtasks import sinks

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    gone = tmp_path / f".tmp-{sinks._HOST}-{dead.stdout.strip()}-abcd1234-0"
    live = tmp_path / f".tmp-{sinks._HOST}-{os.getpid()}-abcd1234-1"
    elsewhere = tmp_path / f".tmp-00000000-{dead.stdout.strip()}-abcd1234-2"
    for path in (gone, live, elsewhere):
        path.write_bytes(b"x")
    assert sweep_temporaries(OutputSettings(str(tmp_path))) == 1
    assert not gone.exists() and live.exists() and elsewhere.exists()
    write_atomic(LocalFileSystem(), str(tmp_path / "f.bin"), b"y")  # its temporary: ours
    assert (tmp_path / "f.bin").read_bytes() == b"y"


def test_sweep_removes_only_stale_temporaries(tmp_path: Path) -> None:
    settings = OutputSettings(str(tmp_path))
    old = time.time() - 3600
    stale = [tmp_path / "ab" / "cd" / ".tmp-a", tmp_path / "manifest" / ".tmp-b"]
    fresh = tmp_path / "ab" / "cd" / ".tmp-live"
    kept = [tmp_path / "ab" / "cd" / "thumb.jpg", tmp_path / "ab" / ".hidden-old"]
    for path in [*stale, fresh, *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    for path in [*stale, *kept]:
        os.utime(path, (old, old))
    assert sweep_temporaries(settings) == 2
    assert not any(p.exists() for p in stale)
    assert fresh.exists() and all(p.exists() for p in kept)
    assert sweep_temporaries(OutputSettings(str(tmp_path / "missing"))) == 0


def test_atomic_write_into_a_directory_removed_since(tmp_path: Path) -> None:
    """The writer remembers directories it made; one removed since is made again."""
    import shutil

    import fsspec

    fs = fsspec.filesystem("file")
    target = tmp_path / "ab" / "cd" / "f.bin"
    write_atomic(fs, str(target), b"first")
    shutil.rmtree(tmp_path / "ab")
    write_atomic(fs, str(target), b"again")
    assert target.read_bytes() == b"again"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_the_known_directories_stay_bounded_and_files_still_land(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sinks, "MAX_KNOWN_DIRS", 8)
    monkeypatch.setattr(sinks, "_made_dirs", set())
    fs = LocalFileSystem()
    for i in range(30):
        sinks.write_atomic(fs, f"{tmp_path}/d{i}/f.jpg", b"x")
        assert len(sinks._made_dirs) <= 8
    sinks.write_atomic(fs, f"{tmp_path}/d0/g.jpg", b"y")  # forgotten, made again: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"d{i}" for i in range(30))
    assert (tmp_path / "d0" / "g.jpg").read_bytes() == b"y"
