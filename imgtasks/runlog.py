"""``<out>/run.log``: one line per finished batch (counts and seconds), plain text."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import IO, Any

from imgtasks.nodes import BatchReport
from imgtasks.sinks import OutputSettings, filesystem, is_local

log = logging.getLogger(__name__)

RUN_LOG = "run.log"
# An object store cannot append: the log goes up as one multipart upload, a part each
# time this much is written (S3's smallest part), and the object appears whole when the
# run ends. The lines used to be kept in memory until then: ~130 bytes a batch, ~2 bytes
# a URL, which at LAION's billions is gigabytes on the client.
REMOTE_PART_BYTES = 5 * 2**20


class BatchLog:
    """Appended to as batches finish: a local file, flushed at every line; on an object
    store, one upload in parts of REMOTE_PART_BYTES, published when the run ends."""

    def __init__(self, output: OutputSettings) -> None:
        self.output = output
        fs, root = filesystem(output)
        self.local = is_local(fs)
        self.file: IO[Any] | None
        if self.local:
            os.makedirs(root, exist_ok=True)
            self.file = open(os.path.join(root, RUN_LOG), "a", encoding="utf-8")  # noqa: SIM115
        else:
            self.file = fs.open(f"{root}/{RUN_LOG}", "wb", block_size=REMOTE_PART_BYTES)

    def __enter__(self) -> BatchLog:
        self.line(f"run started, output {self.output.root}")
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.line("run ended" if kind is None else f"run stopped: {kind.__name__}")
        if self.file is not None:
            self.file.close()  # on an object store: the upload completes, run.log appears

    def write(self, report: BatchReport) -> None:
        counts = " ".join(f"{k}={v}" for k, v in sorted(report.counts.items()))
        self.line(
            f"batch {report.batch_id} entries={report.entries} {counts} "
            f"download_s={report.download_wall_s:.3f} thumbnail_s={report.thumbnail_wall_s:.3f} "
            f"thumbnail_cpu_s={report.thumbnail_cpu_s:.3f}"
        )

    def line(self, text: str) -> None:
        if self.file is None:
            return
        text = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n"
        if self.local:
            self.file.write(text)
            self.file.flush()
            return
        try:
            self.file.write(text.encode())  # uploads a part once REMOTE_PART_BYTES are in
        except Exception as exc:  # the store failed mid-run: the run and its rows go on
            log.warning("%s not written: %s", RUN_LOG, exc)
            with contextlib.suppress(Exception):  # no upload left open, billed, on S3
                self.file.discard()  # type: ignore[attr-defined]  (fsspec's buffered file)
                self.file.closed = True  # type: ignore[misc]  (else its __del__ commits it)
            self.file = None
