"""flows/run.py writing to (and reading a URL list from) a real S3-compatible server.

The test starts moto's S3 server on 127.0.0.1 on a free port. Every subprocess gets
``AWS_ENDPOINT_URL`` (and fake credentials) so that no request can reach a real AWS
endpoint even where an option is not passed through. The flow runs with
``--scheduler processes``: the worker processes, not the client, write the thumbnails
and manifest parts.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, free_port, subprocess_environment

RUN = str(ROOT / "flows" / "run.py")
URL_COUNT = 20
BUCKET = "imgtasks-test"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
}


@dataclass(frozen=True)
class S3:
    endpoint: str

    @property
    def options(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def fs(self):  # s3fs is a test-only dependency
        import s3fs

        # skip_instance_cache: see objects written by other processes, not a cached listing
        return s3fs.S3FileSystem(**self.options, skip_instance_cache=True)

    def env(self) -> dict[str, str]:
        env = subprocess_environment()
        env.update(CREDENTIALS)
        env["AWS_ENDPOINT_URL"] = self.endpoint  # a default for anything not told explicitly
        env["NO_PROXY"] = "127.0.0.1,localhost"
        return env


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        store = S3(f"http://127.0.0.1:{port}")
        store.fs().makedirs(BUCKET, exist_ok=True)  # moto's store is per process
        yield store
    finally:
        server.stop()


def run_flow(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            RUN,
            "--no-progress",
            "--scheduler",
            "processes",
            "--cpu-workers",
            "2",
            "--batch-size",
            "4",
            "--dashboard-address",
            f"127.0.0.1:{free_port()}",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def check_s3_outputs(s3: S3, prefix: str, urls: list[str]) -> pd.DataFrame:
    fresh = {**s3.options, "skip_instance_cache": True}  # no listing cached by a former call
    df = pd.read_parquet(f"s3://{prefix}/manifest", storage_options=fresh)
    df = df.sort_values("index").reset_index(drop=True)
    assert list(df["url"]) == urls  # one row per URL
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"][["url", "status", "error"]]
    fs = s3.fs()
    files = {p.removeprefix(f"{prefix}/") for p in fs.find(prefix)}
    thumbs = {p for p in files if p.endswith(".jpg") and p != "contact_sheet.jpg"}
    assert thumbs == set(df["path"])
    for path in list(thumbs)[:3]:
        assert fs.cat_file(f"{prefix}/{path}")[:2] == b"\xff\xd8"  # JPEG
    parts = [p for p in files if p.startswith("manifest/part-") and p.endswith(".parquet")]
    # the 5 batches' parts rolled into one at the end of the run (imgtasks.manifest)
    assert len(parts) == 1 and parts[0].endswith("-00000000_00000004.parquet"), parts
    assert "run.log" in files
    return df


def image_requests(demo_server) -> dict[str, int]:
    return {p: n for p, n in demo_server.request_counts().items() if p.startswith("/img/")}


@pytest.mark.timeout(120)
def test_workers_write_to_s3_and_resume_skips_finished_urls(
    s3: S3, demo_server, tmp_path: Path
) -> None:
    urls = demo_server.urls(URL_COUNT)
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    prefix = f"{BUCKET}/run"
    args = [
        "--urls",
        str(listing),
        "--out",
        f"s3://{prefix}",
        "--storage-options",
        json.dumps(s3.options),
    ]
    proc = run_flow(args, s3.env(), tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    df = check_s3_outputs(s3, prefix, urls)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("s3*"))  # nothing local

    # one thumbnail lost: --resume fetches exactly that URL again and nothing else
    lost = df.iloc[7]
    s3.fs().rm_file(f"{prefix}/{lost['path']}")
    demo_server.reset_counts()
    proc = run_flow([*args, "--resume"], s3.env(), tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"resume: {URL_COUNT - 1} URLs already done" in proc.stdout
    lost_path = lost["url"].removeprefix(demo_server.base_url)
    assert image_requests(demo_server) == {lost_path: 1}
    check_s3_outputs(s3, prefix, urls)


@pytest.mark.timeout(90)
def test_url_list_read_from_s3(s3: S3, demo_server, tmp_path: Path) -> None:
    """``--urls s3://...``: the flow does not pass ``--storage-options`` to the source, so
    the list's endpoint comes from fsspec's environment config (``FSSPEC_S3``).
    ``AWS_ENDPOINT_URL`` points at a closed port here: only that config can reach moto."""
    urls = demo_server.urls(URL_COUNT)
    s3.fs().pipe_file(f"{BUCKET}/lists/urls.txt", ("\n".join(urls) + "\n").encode())
    env = s3.env()
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env["FSSPEC_S3"] = json.dumps(s3.options)
    prefix = f"{BUCKET}/from-list"
    proc = run_flow(
        [
            "--urls",
            f"s3://{BUCKET}/lists/urls.txt",
            "--out",
            f"s3://{prefix}",
            "--storage-options",
            json.dumps(s3.options),
        ],
        env,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    check_s3_outputs(s3, prefix, urls)


def test_the_run_log_goes_up_in_parts_and_appears_whole_at_the_end(s3: S3) -> None:
    """On an object store run.log is one multipart upload: the client keeps at most a part
    (it kept every line until the end, ~2 bytes a URL), and no reader sees a partial log."""
    from imgtasks.nodes import BatchReport
    from imgtasks.runlog import REMOTE_PART_BYTES, BatchLog
    from imgtasks.sinks import OutputSettings

    output = OutputSettings(f"s3://{BUCKET}/run-log", storage_options=s3.options)
    batches = 50_000  # ~6.5 MB of lines: more than a part
    with BatchLog(output) as log:
        for batch_id in range(batches):
            log.write(BatchReport(batch_id, "", {"ok": 16}, entries=16))
        assert log.file is not None
        assert log.file.offset > 0  # a part already went up
        assert log.file.buffer.tell() < REMOTE_PART_BYTES  # the rest waits here
        assert not s3.fs().exists(f"{BUCKET}/run-log/run.log")
    lines = s3.fs().cat_file(f"{BUCKET}/run-log/run.log").decode().splitlines()
    assert len(lines) == batches + 2
    assert lines[0].endswith(f"run started, output s3://{BUCKET}/run-log")
    assert lines[-1].endswith(" run ended")
    assert [line.split()[2] for line in lines[1:-1]] == [str(b) for b in range(batches)]
    assert lines[1].split(" ", 1)[1].startswith("batch 0 entries=16 ok=16 download_s=0.000")


def test_a_store_that_fails_mid_run_costs_the_run_log_only(
    s3: S3, caplog: pytest.LogCaptureFixture
) -> None:
    """The run goes on without its log, and the upload is not left open (billed) on S3."""
    from imgtasks.nodes import BatchReport
    from imgtasks.runlog import BatchLog
    from imgtasks.sinks import OutputSettings

    output = OutputSettings(f"s3://{BUCKET}/run-log-lost", storage_options=s3.options)
    with BatchLog(output) as log:
        for batch_id in range(50_000):  # a part up: the multipart upload is open
            log.write(BatchReport(batch_id, "", {"ok": 16}, entries=16))
        assert log.file is not None and log.file.offset > 0
        assert s3.fs().list_multipart_uploads(BUCKET)

        def store_gone(data: bytes) -> int:
            raise OSError("connection refused")

        log.file.write = store_gone  # type: ignore[method-assign]
        log.write(BatchReport(50_000, "", {"ok": 16}, entries=16))
        log.write(BatchReport(50_001, "", {"ok": 16}, entries=16))  # no second warning
    assert [r.getMessage() for r in caplog.records if r.name == "imgtasks.runlog"] == [
        "run.log not written: connection refused"
    ]
    assert not s3.fs().list_multipart_uploads(BUCKET)
    assert not s3.fs().exists(f"{BUCKET}/run-log-lost/run.log")
