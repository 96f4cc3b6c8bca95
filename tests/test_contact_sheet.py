"""The contact sheet: geometry, failure tiles, fidelity, determinism, end to end on a directory."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgtasks.contact_sheet import (
    CONTACT_SHEET,
    FAILED_GREY,
    LABEL_HEIGHT,
    MAX_TILES,
    PAD,
    Tile,
    label_box,
    manifest_head,
    render_contact_sheet,
    sheet_size,
    tile_box,
    tiles_from_manifest,
    write_contact_sheet,
)
from imgtasks.imagecheck import encode, photo_like
from imgtasks.manifest import Record, write_manifest_part
from imgtasks.sinks import OutputSettings, output_relpath, write_file


def solid(
    colour: tuple[int, int, int], size: tuple[int, int] = (128, 96), fmt: str = "JPEG"
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def sheet_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG"
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def crop(pixels: np.ndarray, box: tuple[int, int, int, int], inset: int = 0) -> np.ndarray:
    left, top, right, bottom = box
    return pixels[top + inset : bottom - inset, left + inset : right - inset]


@pytest.mark.parametrize(
    ("n", "columns", "rows"),
    [(1, 1, 1), (2, 2, 1), (8, 8, 1), (9, 8, 2), (17, 8, 3), (64, 8, 8), (65, 8, 8), (200, 8, 8)],
)
def test_grid_dimensions(n: int, columns: int, rows: int) -> None:
    tiles = [Tile(i, "ok", None) for i in range(n)]
    expected = (columns * (128 + PAD) + PAD, rows * (128 + LABEL_HEIGHT + PAD) + PAD)
    assert sheet_size(n) == expected
    with Image.open(io.BytesIO(render_contact_sheet(tiles))) as im:
        assert im.size == expected


def test_grid_dimensions_with_other_geometry() -> None:
    tiles = [Tile(i, "http_5xx", None) for i in range(10)]
    data = render_contact_sheet(tiles, tile_size=(64, 48), columns=4, label_height=12)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (4 * (64 + PAD) + PAD, 3 * (48 + 12 + PAD) + PAD)


def test_boxes_follow_the_documented_layout() -> None:
    assert tile_box(0, 20) == (PAD, PAD, PAD + 128, PAD + 128)
    assert label_box(0, 20) == (PAD, PAD + 128, PAD + 128, PAD + 128 + LABEL_HEIGHT)
    left, top, _, _ = tile_box(9, 20)  # second row, second column
    assert (left, top) == (PAD + 132, PAD + 128 + LABEL_HEIGHT + PAD)
    width, height = sheet_size(20)
    last = tile_box(19, 20)
    assert last[2] <= width - PAD and last[3] + LABEL_HEIGHT <= height - PAD


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        render_contact_sheet([])
    with pytest.raises(ValueError):
        render_contact_sheet([Tile(0, "ok", None)], tile_size=(0, 128))


@pytest.mark.parametrize("status", ["http_4xx", "decode_error", "too_many_redirects"])
def test_failure_is_a_grey_tile_with_its_status_written_on_it(status: str) -> None:
    good = solid((200, 30, 30))
    tiles = [Tile(0, "ok", good), Tile(1, status, None), Tile(2, "ok", good)]
    pixels = sheet_image(render_contact_sheet(tiles))
    area = crop(pixels, tile_box(1, 3))
    # the corners of the tile (away from the text) are plain grey
    corner = area[4:24, 4:24].reshape(-1, 3)
    assert np.abs(corner - np.array(FAILED_GREY)).max() <= 8
    # the status text: a band across the middle holds dark pixels
    middle = area[48:80, 4:124]
    assert (middle.mean(axis=2) < 70).sum() > 30, "no status text drawn on the grey tile"
    # the label strip holds light text on the dark background
    strip = crop(pixels, label_box(1, 3))
    assert (strip.mean(axis=2) > 150).sum() > 10, "no index label drawn"
    # the grey tile is not the good tiles' red
    assert abs(area[:, :, 0].mean() - area[:, :, 1].mean()) < 10


def test_status_text_differs_per_status() -> None:
    one = sheet_image(render_contact_sheet([Tile(0, "http_4xx", None)]))
    two = sheet_image(render_contact_sheet([Tile(0, "decode_error", None)]))
    assert np.abs(one - two).sum() > 1000


def test_good_tile_resembles_its_thumbnail() -> None:
    photo = photo_like(128, 96, seed=3)
    data = encode(photo, "JPEG", quality=95)
    tiles = [Tile(0, "ok", data), Tile(1, "ok", solid((20, 200, 40), (96, 128), "PNG"))]
    pixels = sheet_image(render_contact_sheet(tiles))
    # a 128x96 picture is centred vertically in the 128x128 box
    left, top, right, _ = tile_box(0, 2)
    placed = pixels[top + 16 : top + 112, left:right]
    reference = np.asarray(photo.convert("RGB"), dtype=np.int16)
    assert np.abs(placed.mean(axis=(0, 1)) - reference.mean(axis=(0, 1))).max() < 4
    assert np.abs(placed - reference).mean() < 12
    # a 96x128 PNG is centred horizontally
    left, top, _, _ = tile_box(1, 2)
    green = pixels[top + 8 : top + 120, left + 24 : left + 104].reshape(-1, 3).mean(axis=0)
    assert np.abs(green - np.array([20, 200, 40])).max() < 6


def test_odd_images_are_flattened_or_scaled() -> None:
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent
    big = solid((0, 0, 250), (512, 256))
    tiles = [Tile(0, "ok", encode(rgba, "PNG")), Tile(1, "ok", big)]
    pixels = sheet_image(render_contact_sheet(tiles))
    transparent = crop(pixels, tile_box(0, 2), inset=40)
    assert transparent.mean(axis=(0, 1)).max() < 50  # the dark background shows through
    left, top, right, _ = tile_box(1, 2)
    scaled = pixels[top + 40 : top + 88, left + 4 : right - 4]  # 512x256 -> 128x64, centred
    assert np.abs(scaled.reshape(-1, 3).mean(axis=0) - np.array([0, 0, 250])).max() < 8


@pytest.mark.parametrize(
    "data", [b"<html>not an image</html>", b"\xff\xd8\xff" + b"\x00" * 50, b"\x89PNG\r\n\x1a\n"]
)
def test_undecodable_image_becomes_an_unreadable_tile(data: bytes) -> None:
    reference = sheet_image(render_contact_sheet([Tile(0, "unreadable", None)]))
    pixels = sheet_image(render_contact_sheet([Tile(0, "ok", data)]))
    assert np.abs(pixels - reference).max() <= 2  # drawn exactly like a tile saying "unreadable"


def test_truncated_and_bomb_images_do_not_raise() -> None:
    from imgtasks.demo.corpus import make_bomb_png, truncate

    full = encode(photo_like(400, 300, seed=1), "JPEG", quality=90)
    tiles = [Tile(0, "ok", truncate(full, 0.3)), Tile(1, "ok", make_bomb_png())]
    with Image.open(io.BytesIO(render_contact_sheet(tiles))) as im:
        assert im.size == sheet_size(2)


def test_rendering_is_deterministic() -> None:
    tiles = [
        Tile(i, "ok" if i % 3 else "http_5xx", solid((i * 20, 100, 50)) if i % 3 else None)
        for i in range(12)
    ]
    assert render_contact_sheet(tiles) == render_contact_sheet(list(tiles))


def test_tiles_from_manifest_reads_only_the_first_rows_in_index_order() -> None:
    rows = [
        {"index": i, "status": "ok" if i % 5 else "timeout", "path": f"t/{i}.jpg" if i % 5 else ""}
        for i in reversed(range(100))
    ]
    rows.append({"index": 7, "status": "duplicate", "path": "t/3.jpg"})  # a later row wins
    read: list[str] = []

    def reader(path: str) -> bytes | None:
        read.append(path)
        if path == "t/4.jpg":
            raise FileNotFoundError(path)
        return b"x" if path != "t/6.jpg" else None

    tiles = tiles_from_manifest(rows, reader, limit=80)
    assert [t.index for t in tiles] == list(range(MAX_TILES))  # capped at 64
    assert len(read) == len(set(read)) <= MAX_TILES
    assert tiles[0] == Tile(0, "timeout", None)
    assert tiles[4] == Tile(4, "ok", None)  # raised: shown as missing
    assert tiles[6] == Tile(6, "ok", None)
    assert tiles[7] == Tile(7, "duplicate", b"x")
    assert "t/70.jpg" not in read
    assert tiles_from_manifest(rows, reader, limit=3) == tiles[:3]


def test_missing_thumbnail_of_an_ok_row_says_missing() -> None:
    a = sheet_image(render_contact_sheet([Tile(0, "ok", None)]))
    b = sheet_image(render_contact_sheet([Tile(0, "missing", None)]))
    assert np.abs(a - b).max() <= 2


def write_run(out: OutputSettings, run_id: str, n: int, batch: int = 16) -> list[Record]:
    """A fake run's outputs: thumbnails of every 4th URL failing with http_4xx."""
    records = []
    for i in range(n):
        url = f"http://127.0.0.1/img/{i}.jpg"
        if i % 4 == 3:
            records.append(Record(i, url, "http_4xx", http_status=404))
            continue
        path = output_relpath(url, "jpg")
        write_file(out, path, solid((10 + 3 * i, 120, 200 - 2 * i)))
        records.append(Record(i, url, "ok", path=path, width=128, height=96))
    for b in range(math.ceil(n / batch)):
        write_manifest_part(out, run_id, b, records[b * batch : (b + 1) * batch])
    return records


def test_write_contact_sheet_end_to_end(tmp_path: Path) -> None:
    out = OutputSettings(str(tmp_path / "out"))
    assert write_contact_sheet(out) is None  # no manifest: nothing written
    assert not (tmp_path / "out" / CONTACT_SHEET).exists()
    write_run(out, "20240101T000000-aaaaaa", 100)
    relpath = write_contact_sheet(out, run_id="20240101T000000-aaaaaa")
    assert relpath == CONTACT_SHEET
    written = (tmp_path / "out" / CONTACT_SHEET).read_bytes()
    assert not list((tmp_path / "out").glob(".tmp-*"))
    pixels = sheet_image(written)
    assert pixels.shape[:2][::-1] == sheet_size(64)
    for position in (0, 1, 2, 3, 63):
        area = crop(pixels, tile_box(position, 64), inset=20)
        colour = area.reshape(-1, 3).mean(axis=0)
        if position % 4 == 3:
            assert np.abs(colour - np.array(FAILED_GREY)).max() < 40  # grey, some text
        else:
            expected = np.array([10 + 3 * position, 120, 200 - 2 * position])
            assert np.abs(colour - expected).max() < 6
    # the same without run_id (every part), and from explicit rows: the same picture
    assert write_contact_sheet(out) == CONTACT_SHEET
    assert (tmp_path / "out" / CONTACT_SHEET).read_bytes() == written


def test_manifest_head_reads_few_parts_and_newest_rows_win(tmp_path: Path) -> None:
    out = OutputSettings(str(tmp_path / "out"))
    write_run(out, "20240101T000000-aaaaaa", 40, batch=8)
    # a later run where index 0 failed
    write_manifest_part(out, "20240102T000000-bbbbbb", 0, [Record(0, "u", "timeout")])
    rows = manifest_head(out, limit=10)
    assert [r["index"] for r in rows] == list(range(10))
    assert rows[0]["status"] == "timeout"
    first = manifest_head(out, run_id="20240101T000000-aaaaaa", limit=10)
    assert [r["index"] for r in first] == list(range(10))
    assert first[0]["status"] == "ok"
    assert manifest_head(out, run_id="nope") == []


def test_write_contact_sheet_on_an_fsspec_url(tmp_path: Path) -> None:
    out = OutputSettings(f"file://{tmp_path}/remote")
    write_run(out, "r1", 5)
    assert write_contact_sheet(out, run_id="r1") == CONTACT_SHEET
    with Image.open(tmp_path / "remote" / CONTACT_SHEET) as im:
        assert im.size == sheet_size(5)


def test_unsafe_paths_are_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(solid((255, 0, 0)))
    out = OutputSettings(str(tmp_path / "out"))
    rows = [
        {"index": 0, "status": "ok", "path": "../secret.jpg"},
        {"index": 1, "status": "ok", "path": str(secret)},
    ]
    assert write_contact_sheet(out, rows) == CONTACT_SHEET
    pixels = sheet_image((tmp_path / "out" / CONTACT_SHEET).read_bytes())
    for position in (0, 1):
        corner = crop(pixels, tile_box(position, 2))[4:20, 4:20].reshape(-1, 3)
        assert np.abs(corner - np.array(FAILED_GREY)).max() <= 8  # "missing", not the red file
