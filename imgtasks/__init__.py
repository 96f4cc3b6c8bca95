"""imgtasks: download image URLs concurrently and make thumbnails, on a laptop or a Dask cluster.

    import imgtasks
    result = imgtasks.thumbnails("urls.parquet", out="thumbs/", client=client)
    result.counts, result.manifest()

``import imgtasks`` stays light: the API (and dask) load on first use of a name below.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "ClusterSettings",
    "DownloadSettings",
    "Interrupted",
    "OutputSettings",
    "Result",
    "SetupError",
    "ThumbSettings",
    "job_page",
    "local_cluster",
    "thumbnails",
]

_WHERE = {
    "thumbnails": "imgtasks.api",
    "Result": "imgtasks.api",
    "Interrupted": "imgtasks.api",
    "SetupError": "imgtasks.preflight",
    "ClusterSettings": "imgtasks.cluster",
    "local_cluster": "imgtasks.cluster",
    "job_page": "imgtasks.jobserver",
    "DownloadSettings": "imgtasks.download",
    "ThumbSettings": "imgtasks.thumbnail",
    "OutputSettings": "imgtasks.sinks",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'imgtasks' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
