"""John's two functions from the seed exercise, for ``seed_exercise.ipynb``.

They live in a module, not in the notebook, because a process pool sends its workers the
function *by name*: a worker started with spawn or forkserver imports it, and a function
defined in a notebook cell cannot be imported. Plain ``requests`` and Pillow, no imgtasks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import requests
from PIL import Image

THUMB_SIZE = (128, 128)
JPEG_QUALITY = 90  # the same as imgtasks.thumbnails' default, so the timings compare


def save_url(url: str, folder: Path) -> bool:
    """Download one URL into ``folder`` under its own file name; False if it failed."""
    try:
        response = requests.get(url, timeout=60)
    except requests.RequestException:
        return False
    if response.status_code != 200:
        return False
    (folder / url.rsplit("/", 1)[-1]).write_bytes(response.content)
    return True


def make_thumbnail(path: Path, folder: Path) -> bool:
    """Write a thumbnail of the image file ``path`` into ``folder`` as ``<stem>.jpg``."""
    try:
        with Image.open(path) as image:
            image.thumbnail(THUMB_SIZE)  # before convert(): JPEGs then decode at 1/8 size
            image.convert("RGB").save(folder / f"{path.stem}.jpg", quality=JPEG_QUALITY)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    return True


def empty_folder(path: str | Path) -> Path:
    """``path`` as a new, empty folder (what an earlier run left there is removed)."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file())
