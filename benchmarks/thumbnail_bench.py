"""Benchmark: thumbnails per second on ONE core, make_thumbnail vs the naive Pillow path.

    python benchmarks/thumbnail_bench.py [--repeat 3] [--limit N] [--no-pin]

(after ``pip install -e .``, or with the repository root on ``PYTHONPATH``).

Both methods run side by side in one process, interleaved per image so neither gets a
warmer cache or a quieter machine. Each image's time is the best of ``--repeat`` runs;
images/s is the subset's image count over the sum of those times. The naive path is
``Image.open -> convert('RGB') -> thumbnail((128, 128)) -> save JPEG q=90``.

Quality: each method's resized pixels (before JPEG encoding) against a full-decode,
EXIF-oriented, single-pass LANCZOS reference, as PSNR in dB. The naive path ignores EXIF
orientation, so rotated images come out the wrong shape: they are counted, not scored.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from imgtasks.imagecheck import encode, photo_like, psnr, reference_resize
from imgtasks.thumbnail import DEFAULT_THUMB, make_thumbnail, render_thumbnail

BOX = DEFAULT_THUMB.size
TWELVE_MP = 11_000_000  # 4000x3000 = 12.0 MP; leave room for odd phone sizes


@dataclass(frozen=True)
class Item:
    name: str
    ext: str
    width: int
    height: int
    data: bytes

    @property
    def is_12mp_jpeg(self) -> bool:
        return self.ext == "jpg" and self.width * self.height >= TWELVE_MP


@dataclass
class Scores:
    """Best time and PSNR of one method on one image."""

    seconds: float = math.inf
    psnr_db: float | None = None  # None: output shape differs from the reference


# --------------------------------------------------------------------------- the two methods


def naive_resized(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im.thumbnail(BOX)
    return im


def naive(data: bytes) -> bytes:
    buf = io.BytesIO()
    naive_resized(data).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def fast(data: bytes) -> bytes:
    thumb = make_thumbnail(data, DEFAULT_THUMB)
    if not thumb.ok or thumb.data is None:
        raise RuntimeError(f"make_thumbnail failed: {thumb.status}: {thumb.error}")
    return thumb.data


def fast_resized(data: bytes) -> Image.Image:
    return render_thumbnail(data, DEFAULT_THUMB).image


METHODS: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], Image.Image]]] = {
    "naive": (naive, naive_resized),
    "fast": (fast, fast_resized),
}


# --------------------------------------------------------------------------- corpus


def load_items(limit: int | None) -> list[Item]:
    try:
        from imgtasks.demo.corpus import load_corpus
    except ImportError as exc:
        print(f"imgtasks.demo.corpus unavailable ({exc}); using a small synthetic corpus instead")
        items = synthetic_items()
    else:
        items = [Item(c.name, c.ext, c.width, c.height, c.data) for c in load_corpus("photos")]
    items.sort(key=lambda i: i.name)
    if not limit or limit >= len(items):
        return items
    # Evenly spaced, so a small --limit still mixes formats and sizes.
    return [items[i * len(items) // limit] for i in range(limit)]


def synthetic_items() -> list[Item]:
    """Fallback: 3 x 12 MP JPEG, 4 x 1080p JPEG, 2 x 1080p PNG from photo_like."""
    specs = [(4000, 3000, "jpg")] * 3 + [(1920, 1080, "jpg")] * 4 + [(1920, 1080, "png")] * 2
    items = []
    for seed, (w, h, ext) in enumerate(specs):
        im = photo_like(w, h, seed=seed)
        data = encode(im, "JPEG", quality=90) if ext == "jpg" else encode(im, "PNG")
        items.append(Item(f"synthetic{seed}", ext, w, h, data))
    return items


# --------------------------------------------------------------------------- measuring


def pin_to_one_core() -> str:
    """Run on a single CPU so the figure is per core whatever the libraries do."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity)"
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


def time_all(items: Sequence[Item], repeat: int) -> dict[str, list[Scores]]:
    scores = {name: [Scores() for _ in items] for name in METHODS}
    for run, _ in METHODS.values():  # warm-up: imports, codec tables
        run(items[0].data)
    for _ in range(repeat):
        for i, item in enumerate(items):
            for name, (run, _) in METHODS.items():
                start = time.perf_counter()
                run(item.data)
                elapsed = time.perf_counter() - start
                scores[name][i].seconds = min(scores[name][i].seconds, elapsed)
    return scores


def score_quality(items: Sequence[Item], scores: dict[str, list[Scores]]) -> None:
    for i, item in enumerate(items):
        reference = reference_resize(item.data, BOX)
        for name, (_, resized) in METHODS.items():
            out = resized(item.data)
            if out.size == reference.size:
                scores[name][i].psnr_db = psnr(out, reference)


# --------------------------------------------------------------------------- reporting


def summarise(label: str, picked: list[int], scores: dict[str, list[Scores]]) -> str:
    if not picked:
        return f"{label:<14} {0:>3}  (none)"
    cells = [f"{label:<14} {len(picked):>3}"]
    rates = {}
    for name in METHODS:
        rows = [scores[name][i] for i in picked]
        rates[name] = len(rows) / sum(r.seconds for r in rows)
        cells.append(f"{rates[name]:>9.1f}")
    cells.append(f"{rates['fast'] / rates['naive']:>7.2f}x")
    for name in METHODS:
        cells.append(psnr_cell([scores[name][i] for i in picked]))
    return "  ".join(cells)


def psnr_cell(rows: list[Scores]) -> str:
    values = [r.psnr_db for r in rows if r.psnr_db is not None]
    wrong = len(rows) - len(values)
    if not values:
        return f"{'n/a':>13}" + (f" ({wrong} wrong shape)" if wrong else "")
    finite = [v for v in values if math.isfinite(v)] or [99.0]
    text = f"{statistics.mean(finite):>5.1f} / {min(values):>5.1f}"
    return text + (f" ({wrong} wrong shape)" if wrong else "")


def report(items: Sequence[Item], scores: dict[str, list[Scores]]) -> None:
    print(
        f"{'subset':<14} {'n':>3}  {'naive/s':>9}  {'fast/s':>9}  {'speedup':>8}"
        f"  {'naive PSNR mean/min':>13}  {'fast PSNR mean/min':>13}"
    )
    everything = list(range(len(items)))
    print(summarise("all", everything, scores))
    print(summarise("12MP JPEG", [i for i in everything if items[i].is_12mp_jpeg], scores))
    for ext in sorted({item.ext for item in items}):
        print(summarise(f"  {ext}", [i for i in everything if items[i].ext == ext], scores))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per image; best is kept")
    parser.add_argument("--limit", type=int, default=None, help="use N evenly spaced images")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    args = parser.parse_args(argv)
    if args.repeat < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--repeat and --limit must be positive")
    pinned = "not pinned" if args.no_pin else pin_to_one_core()
    items = load_items(args.limit)
    megabytes = sum(len(i.data) for i in items) / 1e6
    print(
        f"{len(items)} images ({megabytes:.1f} MB), box {BOX[0]}x{BOX[1]}, repeat {args.repeat}, "
        f"{pinned}, Pillow {Image.__version__}, Python {sys.version.split()[0]}"
    )
    scores = time_all(items, args.repeat)
    score_quality(items, scores)
    report(items, scores)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
