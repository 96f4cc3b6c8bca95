"""``<out>/run.log``: one line per finished batch (counts and seconds), plain text."""

from __future__ import annotations

import os
import time
from typing import IO

from imgtasks.nodes import BatchReport
from imgtasks.sinks import OutputSettings, filesystem, is_local, write_file

RUN_LOG = "run.log"


class BatchLog:
    """Appended to as batches finish on a local output; written once at the end to an
    object store (which cannot append)."""

    def __init__(self, output: OutputSettings) -> None:
        self.output = output
        self.lines: list[str] = []
        self.file: IO[str] | None = None
        fs, root = filesystem(output)
        if is_local(fs):
            os.makedirs(root, exist_ok=True)
            self.file = open(os.path.join(root, RUN_LOG), "a", encoding="utf-8")  # noqa: SIM115

    def __enter__(self) -> BatchLog:
        self.line(f"run started, output {self.output.root}")
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.line("run ended" if kind is None else f"run stopped: {kind.__name__}")
        if self.file is not None:
            self.file.close()
        else:
            write_file(self.output, RUN_LOG, "".join(self.lines).encode())

    def write(self, report: BatchReport) -> None:
        counts = " ".join(f"{k}={v}" for k, v in sorted(report.counts.items()))
        self.line(
            f"batch {report.batch_id} entries={report.entries} {counts} "
            f"download_s={report.download_wall_s:.3f} thumbnail_s={report.thumbnail_wall_s:.3f} "
            f"thumbnail_cpu_s={report.thumbnail_cpu_s:.3f}"
        )

    def line(self, text: str) -> None:
        text = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n"
        if self.file is not None:
            self.file.write(text)
            self.file.flush()
        else:
            self.lines.append(text)
