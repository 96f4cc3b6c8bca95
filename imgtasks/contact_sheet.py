"""A contact sheet: the first thumbnails of a run on one JPEG, failures as labelled grey tiles.

Geometry (all in pixels; ``tile_size = (tile_w, tile_h)``, ``PAD = 4``)::

    n        = min(len(tiles), MAX_TILES)            only the first 64 tiles are drawn
    columns  = min(columns, n)                       8 by default
    rows     = ceil(n / columns)
    width    = columns * (tile_w + PAD) + PAD
    height   = rows * (tile_h + label_height + PAD) + PAD

Tile ``i`` (0-based position in ``tiles``) sits in column ``i % columns``, row
``i // columns``; its image area is the ``tile_w x tile_h`` box at::

    left = PAD + column * (tile_w + PAD)
    top  = PAD + row * (tile_h + label_height + PAD)

and its label strip is the ``tile_w x label_height`` box just below (``top + tile_h``).
A thumbnail is scaled down to fit its box if it is larger and centred in it. The label
strip says ``#<index>`` (plus the status when a tile with an image is not ``ok``, e.g.
``#3 duplicate``). A tile without an image is filled with ``FAILED_GREY`` and has its
status written across the middle (``http_4xx``, ``decode_error``; ``missing`` for an ``ok``
row whose file is gone); a tile whose bytes do not decode is a grey tile saying
``unreadable``. Rendering is pure and deterministic: the same tiles give the same bytes.
"""

from __future__ import annotations

import functools
import heapq
import io
import logging
import math
import posixpath
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from imgtasks.manifest import MANIFEST_DIR, manifest_parts, read_part
from imgtasks.sinks import OutputSettings, filesystem, write_file
from imgtasks.status import Status

log = logging.getLogger(__name__)

CONTACT_SHEET = "contact_sheet.jpg"
MAX_TILES = 64
PAD = 4
TILE_SIZE = (128, 128)
COLUMNS = 8
LABEL_HEIGHT = 16
BACKGROUND = (24, 24, 24)
LABEL_COLOUR = (235, 235, 235)
FAILED_GREY = (128, 128, 128)
FAILED_TEXT = (16, 16, 16)
JPEG_QUALITY = 90
UNREADABLE = "unreadable"
MISSING = "missing"
SHOWN_WITH_IMAGE = (Status.OK, Status.DUPLICATE)  # statuses whose path is a file
MAX_TILE_BYTES = 8 * 1024 * 1024  # a thumbnail file larger than this is not read
MAX_TILE_PIXELS = 16 * 1024 * 1024  # nor decoded beyond this (after JPEG draft reduction)
MANIFEST_COLUMNS = ["index", "status", "path"]

Reader = Callable[[str], "bytes | None"]


@dataclass(frozen=True)
class Tile:
    """One cell of the sheet: the input's index, its status, its encoded thumbnail or None."""

    index: int
    status: str
    image: bytes | None = None


def sheet_size(
    n: int,
    tile_size: tuple[int, int] = TILE_SIZE,
    columns: int = COLUMNS,
    label_height: int = LABEL_HEIGHT,
) -> tuple[int, int]:
    """(width, height) of the sheet for ``n`` tiles (capped at ``MAX_TILES``), as documented."""
    n = min(n, MAX_TILES)
    if n < 1:
        raise ValueError("a contact sheet needs at least one tile")
    tile_w, tile_h = tile_size
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    return cols * (tile_w + PAD) + PAD, rows * (tile_h + label_height + PAD) + PAD


def tile_box(
    position: int,
    n: int,
    tile_size: tuple[int, int] = TILE_SIZE,
    columns: int = COLUMNS,
    label_height: int = LABEL_HEIGHT,
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the image area of the tile at ``position``."""
    cols = min(columns, min(n, MAX_TILES))
    tile_w, tile_h = tile_size
    left = PAD + (position % cols) * (tile_w + PAD)
    top = PAD + (position // cols) * (tile_h + label_height + PAD)
    return left, top, left + tile_w, top + tile_h


def label_box(
    position: int,
    n: int,
    tile_size: tuple[int, int] = TILE_SIZE,
    columns: int = COLUMNS,
    label_height: int = LABEL_HEIGHT,
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the label strip below the tile at ``position``."""
    left, _, right, bottom = tile_box(position, n, tile_size, columns, label_height)
    return left, bottom, right, bottom + label_height


def render_contact_sheet(
    tiles: Sequence[Tile],
    tile_size: tuple[int, int] = TILE_SIZE,
    columns: int = COLUMNS,
    label_height: int = LABEL_HEIGHT,
    background: tuple[int, int, int] = BACKGROUND,
) -> bytes:
    """The first ``MAX_TILES`` tiles on one grid, as JPEG bytes (see the module docstring).

    Raises ``ValueError`` only for bad arguments (no tiles, non-positive sizes); a tile
    whose image does not decode becomes a grey ``unreadable`` tile.
    """
    tile_w, tile_h = tile_size
    if tile_w < 8 or tile_h < 8 or label_height < 0 or columns < 1:
        raise ValueError(
            f"bad geometry: tile_size={tile_size} columns={columns} label_height={label_height}"
        )
    shown = list(tiles[:MAX_TILES])
    size = sheet_size(len(shown), tile_size, columns, label_height)
    sheet = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(sheet)
    for position, tile in enumerate(shown):
        box = tile_box(position, len(shown), tile_size, columns, label_height)
        picture = decode_tile(tile.image, tile_size, background) if tile.image else None
        if picture is not None:
            x = box[0] + (tile_w - picture.width) // 2
            y = box[1] + (tile_h - picture.height) // 2
            sheet.paste(picture, (x, y))
            label = f"#{tile.index}" if tile.status == Status.OK else f"#{tile.index} {tile.status}"
        else:
            if tile.image:
                status = UNREADABLE
            else:
                status = MISSING if tile.status in SHOWN_WITH_IMAGE else tile.status
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=FAILED_GREY)
            _centred_text(draw, box, status or "?", FAILED_TEXT, max(8, min(14, tile_h // 8)))
            label = f"#{tile.index}"
        if label_height >= 6:
            strip = label_box(position, len(shown), tile_size, columns, label_height)
            _centred_text(draw, strip, label, LABEL_COLOUR, max(6, label_height - 4))
    out = io.BytesIO()
    sheet.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def decode_tile(
    data: bytes, tile_size: tuple[int, int], background: tuple[int, int, int] = BACKGROUND
) -> Image.Image | None:
    """The thumbnail as an RGB image fitting ``tile_size``, or None if it does not decode."""
    if len(data) > MAX_TILE_BYTES:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", tile_size)
            if im.width * im.height > MAX_TILE_PIXELS:
                return None
            im.load()
            picture = _to_rgb(im, background)
        if picture.width > tile_size[0] or picture.height > tile_size[1]:
            picture.thumbnail(tile_size, Image.Resampling.LANCZOS)
        return picture
    except Exception as exc:  # any decoder failure: truncated, garbage, bomb, odd mode
        log.debug("contact sheet: tile does not decode: %s", exc)
        return None


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, background)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        im = im.point(lambda v: v * (1 / 256)).convert("L")
    return im.convert("RGB")


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _centred_text(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    text: str,
    colour: tuple[int, int, int],
    size: int,
) -> None:
    """Draw ``text`` centred in ``box``, shrinking the font (then clipping) to fit its width."""
    width = box[2] - box[0] - 4
    font = _font(size)
    while size > 6 and draw.textlength(text, font=font) > width:
        size -= 1
        font = _font(size)
    while len(text) > 1 and draw.textlength(text, font=font) > width:
        text = text[:-1]
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = box[0] + (box[2] - box[0] - (right - left)) // 2 - left
    y = box[1] + (box[3] - box[1] - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=colour, font=font)


# --- from a manifest -------------------------------------------------------------------


def tiles_from_manifest(
    rows: Iterable[Mapping], read: Reader, limit: int = MAX_TILES
) -> list[Tile]:
    """Tiles for the ``limit`` lowest-index rows (``index``, ``status``, ``path``), in order.

    ``read(path)`` returns a thumbnail's bytes (None or an exception: missing). Only rows
    whose status has a file (``ok``, ``duplicate``, ``skipped``) and a path are read, so at
    most ``limit`` distinct files are. A later row with the same index replaces an earlier one.
    """
    limit = min(limit, MAX_TILES)
    latest: dict[int, Mapping] = {}
    for row in rows:
        latest[int(row["index"])] = row
    tiles = []
    cache: dict[str, bytes | None] = {}  # duplicates point at their first occurrence's file
    for index in sorted(latest)[: max(limit, 0)]:
        row = latest[index]
        status = str(row.get("status") or "")
        path = str(row.get("path") or "")
        data = None
        if path and status in SHOWN_WITH_IMAGE:
            if path not in cache:
                cache[path] = _read_quietly(read, path)
            data = cache[path]
        tiles.append(Tile(index, status, data))
    return tiles


def _read_quietly(read: Reader, path: str) -> bytes | None:
    try:
        return read(path)
    except Exception as exc:  # a file that vanished or will not open is a "missing" tile
        log.debug("contact sheet: cannot read %s: %s", path, exc)
        return None


def output_reader(output: OutputSettings) -> Reader:
    """``read(relpath)`` for files under the output root (None if absent, unsafe or huge)."""
    fs, root = filesystem(output)

    def read(relpath: str) -> bytes | None:
        normal = posixpath.normpath(relpath)
        if normal.startswith(("/", "..")) or "://" in relpath:
            return None
        path = f"{root}/{normal}"
        try:
            if fs.size(path) > MAX_TILE_BYTES:
                return None
            return bytes(fs.cat_file(path))
        except (OSError, ValueError):
            return None

    return read


def manifest_head(
    output: OutputSettings, run_id: str | None = None, limit: int = MAX_TILES
) -> list[dict]:
    """The ``limit`` lowest-index manifest rows (``index``, ``status``, ``path`` only).

    With ``run_id``: that run's parts in batch order, stopping once ``limit`` rows are in
    hand (batches hold consecutive indices in order, so a few small files are read). Without
    it: every part, oldest run first, the latest row per index winning.
    """
    parts = manifest_parts(output)
    if run_id is not None:
        parts = [p for p in parts if p.startswith(f"{MANIFEST_DIR}/part-{run_id}-")]
    latest: dict[int, dict] = {}
    for part in parts:
        for row in read_part(output, part, MANIFEST_COLUMNS).to_pylist():
            latest[int(row["index"])] = row
        if run_id is not None and len(latest) >= limit:
            break
        if run_id is None and len(latest) > 4 * limit:  # keep memory flat on huge manifests
            keep = heapq.nsmallest(limit, latest)
            latest = {i: latest[i] for i in keep}
    return [latest[i] for i in sorted(latest)[:limit]]


def write_contact_sheet(
    output: OutputSettings,
    rows: Iterable[Mapping] | None = None,
    *,
    run_id: str | None = None,
    limit: int = MAX_TILES,
) -> str | None:
    """Write ``contact_sheet.jpg`` under the output root, atomically; its relative path.

    ``rows``: manifest rows to show (default: read the first ``limit`` from the manifest,
    of ``run_id`` only if given). Reads at most ``limit`` (<= 64) thumbnails. Returns None,
    writing nothing, when there are no rows.
    """
    limit = min(limit, MAX_TILES)
    if rows is None:
        rows = manifest_head(output, run_id, limit)
    tiles = tiles_from_manifest(rows, output_reader(output), limit)
    if not tiles:
        return None
    write_file(output, CONTACT_SHEET, render_contact_sheet(tiles))
    log.info("contact sheet: %d tiles in %s/%s", len(tiles), output.root, CONTACT_SHEET)
    return CONTACT_SHEET
