"""Test and demo support: a local image server with faults and a fake Imgur API, and the
deterministic photo-like corpus it serves.

Used by the tests, the benchmarks and the flow's demo mode; never imported by the
product's hot path (``import imgtasks`` and the download/thumbnail stages do not load it).

- `imgtasks.demo.server`: `DemoServer`, its `ServerSettings`, the image routes.
- `imgtasks.demo.faults`: `Faults` for ``/img/`` URLs and the hostile routes.
- `imgtasks.demo.imgur_api`: the fake Imgur gallery API.
- `imgtasks.demo.cli`: ``python -m imgtasks.demo`` and `server_process`.
- `imgtasks.demo.corpus`: the corpus, `photo_like` and the hostile-file makers.
"""

from imgtasks.demo.cli import server_process
from imgtasks.demo.faults import FAULT_NAMES, NO_FAULTS, Faults
from imgtasks.demo.server import DEFAULT_SETTINGS, DemoServer, ServerSettings

__all__ = [
    "DEFAULT_SETTINGS",
    "FAULT_NAMES",
    "NO_FAULTS",
    "DemoServer",
    "Faults",
    "ServerSettings",
    "server_process",
]
