"""Input columns carried through: a caption, kept columns, an expected sha256."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_flow
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imgtasks
from imgtasks import manifest
from imgtasks.manifest import KINDS, Record, manifest_row, read_manifest, write_manifest_part
from imgtasks.sinks import OutputSettings
from imgtasks.sources import InputColumns, SourceSettings, kept_kinds, url_batches

CAPTIONS = ["a red square", "", "ünïcode 🐱", 'a, comma "quoted"']
COLUMNS = InputColumns(caption="TEXT", keep=("similarity", "LICENSE"))


def laion_rows(urls: list[str]) -> dict[str, list]:
    """LAION's parquet columns: URL, TEXT, similarity and size and license columns."""
    n = len(urls)
    return {
        "URL": urls,
        "TEXT": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)],
        "similarity": [0.25 + i / 100 for i in range(n)],
        "WIDTH": [640 + i for i in range(n)],
        "LICENSE": ["?" if i % 2 else "cc-by" for i in range(n)],
    }


def write_list(path: Path, rows: dict[str, list]) -> None:
    fmt = path.name.removesuffix(".gz").rsplit(".", 1)[-1]
    if fmt == "parquet":
        pq.write_table(pa.table(rows), path)
        return
    frame = pd.DataFrame(rows)
    if fmt == "jsonl":
        text = frame.to_json(orient="records", lines=True, force_ascii=False)
    else:
        text = frame.to_csv(index=False, sep="\t" if fmt == "tsv" else ",")
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


@pytest.mark.parametrize("name", ["l.csv", "l.tsv.gz", "l.parquet", "l.jsonl"])
def test_every_list_format_carries_caption_and_kept_columns(tmp_path: Path, name: str) -> None:
    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(9)] + ["not a url"]
    rows = laion_rows(urls)
    write_list(tmp_path / name, rows)
    source = SourceSettings(str(tmp_path / name), column="URL", columns=COLUMNS, batch_size=4)
    entries = [e for batch in url_batches(source) for e in batch.entries]
    assert [e.url for e in entries] == urls
    assert [e.carried.caption for e in entries] == rows["TEXT"]
    assert [e.carried.kept[1] for e in entries] == rows["LICENSE"]
    similarity = [float(e.carried.kept[0]) for e in entries]  # text in csv/tsv/jsonl
    assert similarity == pytest.approx(rows["similarity"])
    kinds = dict(kept_kinds(source))
    assert kinds == {
        "similarity": "float64" if "parquet" in name else "string",
        "LICENSE": "string",
    }


def test_a_missing_column_or_a_txt_list_is_a_value_error(tmp_path: Path) -> None:
    write_list(tmp_path / "l.csv", laion_rows(["http://h/a.jpg"]))
    settings_ = SourceSettings(str(tmp_path / "l.csv"), column="URL", columns=InputColumns("CAP"))
    with pytest.raises(ValueError, match="column 'CAP' not in the csv header"):
        list(url_batches(settings_))
    (tmp_path / "l.txt").write_text("http://h/a.jpg\n")
    with pytest.raises(ValueError, match=r"a \.txt list has no columns"):
        list(url_batches(SourceSettings(str(tmp_path / "l.txt"), columns=InputColumns("CAP"))))


def test_a_laion_parquet_through_the_api_keeps_caption_and_typed_columns(
    tmp_path: Path, demo_server
) -> None:
    urls = [*demo_server.urls(6), "not a url", f"{demo_server.base_url}/status/404"]
    rows = laion_rows(urls)
    write_list(tmp_path / "laion.parquet", rows)
    result = imgtasks.thumbnails(
        tmp_path / "laion.parquet",
        tmp_path / "out",
        cluster="sync",
        url_column="URL",
        caption_column="TEXT",
        keep_columns=["similarity", "WIDTH", "LICENSE"],
        progress=False,
    )
    assert result.counts == {"ok": 6, "invalid_url": 1, "http_4xx": 1}
    df = result.manifest().sort_values("index")
    assert list(df["caption"]) == rows["TEXT"]  # failures carry their columns too
    assert list(df["similarity"]) == rows["similarity"]
    assert list(df["WIDTH"]) == rows["WIDTH"] and df["WIDTH"].dtype == "int64"
    assert list(df["LICENSE"]) == rows["LICENSE"]


def test_a_dataframe_through_the_api_and_resume_takes_this_runs_columns(
    tmp_path: Path, demo_server
) -> None:
    urls = demo_server.urls(5)
    frame = pd.DataFrame({"u": urls, "cap": list("abcde"), "n": range(5)})
    out = tmp_path / "out"
    options = {"cluster": "sync", "url_column": "u", "caption_column": "cap", "progress": False}
    imgtasks.thumbnails(frame, out, keep_columns="n", **options)
    frame["cap"] = list("vwxyz")
    again = imgtasks.thumbnails(frame, out, keep_columns=["n"], resume=True, **options)
    assert again.resumed == 5
    df = again.manifest().sort_values("index")
    assert list(df["caption"]) == list("vwxyz") and list(df["n"]) == list(range(5))
    with pytest.raises(ValueError, match="has no columns"):
        imgtasks.thumbnails(urls, out, **options)
    with pytest.raises(ValueError, match="share a manifest column's name"):
        imgtasks.thumbnails(frame.assign(status=1), out, keep_columns=["status"], **options)


def body_sha256(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return hashlib.sha256(response.read()).hexdigest()


def test_a_body_whose_sha256_differs_is_hash_mismatch_and_nothing_is_kept(
    tmp_path: Path, demo_server
) -> None:
    urls = demo_server.urls(3)
    digests = [body_sha256(urls[0]).upper(), "0" * 64, ""]  # upper case matches; "" unchecked
    listing = tmp_path / "l.jsonl"
    listing.write_text(
        "".join(json.dumps({"url": u, "sha": d}) + "\n" for u, d in zip(urls, digests, strict=True))
    )
    result = imgtasks.thumbnails(
        listing,
        tmp_path / "out",
        cluster="sync",
        verify_hash_column="sha",
        keep_originals=tmp_path / "orig",
        progress=False,
    )
    df = result.manifest().sort_values("index")
    assert list(df["status"]) == ["ok", "hash_mismatch", "ok"]
    bad = df.iloc[1]
    assert bad["path"] == "" and bad["original_path"] == "" and bad["sha256"] != "0" * 64
    assert "expected 000" in bad["error"]
    assert len(list((tmp_path / "orig").rglob("*.*"))) == 2


def test_the_command_line_maps_the_column_flags(
    tmp_path: Path, demo_server, subprocess_env: dict[str, str]
) -> None:
    urls = demo_server.urls(2)
    with urllib.request.urlopen(urls[0], timeout=30) as response:  # its true sha256
        good = hashlib.sha256(response.read()).hexdigest()
    listing = tmp_path / "laion.csv"
    pd.DataFrame(
        {
            "URL": urls,
            "TEXT": ["a cat", "a dog"],
            "similarity": [0.31, 0.42],
            "LICENSE": ["cc-by", "?"],
            "sha": [good, "0" * 64],
        }
    ).to_csv(listing, index=False)
    out = tmp_path / "out"
    args = ["--urls", str(listing), "--out", str(out), "--scheduler", "sync"]
    args += ["--url-column", "URL", "--caption-column", "TEXT"]
    args += ["--keep-columns", "similarity, LICENSE", "--verify-hash-column", "sha"]
    proc = run_flow(args, subprocess_env)
    assert proc.returncode == 0, proc.stderr
    df = pd.read_parquet(out / "manifest").sort_values("index")
    assert list(df["status"]) == ["ok", "hash_mismatch"]
    assert list(df["caption"]) == ["a cat", "a dog"]
    assert list(df["LICENSE"]) == ["cc-by", "?"]
    assert [float(v) for v in df["similarity"]] == [0.31, 0.42]


_ANY = st.none() | st.integers() | st.floats() | st.text(max_size=20) | st.booleans()
_ANY = _ANY | st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=3), _ANY)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.tuples(_ANY, _ANY, _ANY, _ANY), min_size=1, max_size=5))
def test_any_kept_value_fits_its_column(tmp_path_factory, values: list[tuple]) -> None:
    kept = tuple((f"c_{kind}", kind) for kind in KINDS)
    out = OutputSettings(str(tmp_path_factory.mktemp("m")))
    records = [
        Record(i, f"http://h/{i}", "ok", kept=tuple(zip([n for n, _ in kept], row, strict=True)))
        for i, row in enumerate(values)
    ]
    write_manifest_part(out, "run", 0, records, kept)
    back = read_manifest(out).to_pylist()
    for record, row in zip(records, back, strict=True):
        want = manifest_row(record, kept)
        for name, _ in kept:
            got = row[name]
            assert got == want[name] or (isinstance(got, float) and math.isnan(got)), name


_KIND_VALUES = {
    pa.int64(): st.integers(-(2**63), 2**63 - 1),
    pa.int32(): st.integers(-(2**31), 2**31 - 1),
    pa.float64(): st.floats(),
    pa.bool_(): st.booleans(),
    pa.string(): st.text(max_size=12).map(lambda t: t.encode("utf-8", "backslashreplace").decode()),
    pa.binary(): st.binary(max_size=12),
}


@settings(max_examples=60, deadline=None)
@given(data=st.data(), kind=st.sampled_from(list(_KIND_VALUES)))
def test_a_column_from_buffers_is_what_pa_array_makes(data, kind: pa.DataType) -> None:
    """``manifest.column_array`` (no pandas) against ``pa.array`` (which imports it)."""
    values = data.draw(st.lists(st.none() | _KIND_VALUES[kind], max_size=40))
    built = manifest.column_array(values, kind)
    built.validate(full=True)
    assert built.type == kind and built.null_count == values.count(None)
    expected = pa.array(values, kind).to_pylist()
    assert _same(built.to_pylist(), values) and _same(built.to_pylist(), expected)


def _same(got: list, want: list) -> bool:
    """Equal lists, NaN equal to NaN."""
    return len(got) == len(want) and all(
        a == b or (a != a and b != b) for a, b in zip(got, want, strict=True)
    )


def test_text_past_the_offset_limit_comes_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """32-bit offsets: a column holding more comes in chunks that each fit, as from pa.array."""
    monkeypatch.setattr(manifest, "_MAX_OFFSET", 10)
    values = [b"abcd", None, b"efgh", b"ijkl", b"", b"mnop"]
    built = manifest.column_array(values, pa.binary())
    assert isinstance(built, pa.ChunkedArray) and built.num_chunks > 1
    assert all(sum(len(v or b"") for v in c.to_pylist()) <= 10 for c in built.chunks)
    assert built.to_pylist() == values
