"""Filters (--min-size, --max-aspect-ratio), originals kept as they are, the perceptual hash."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_flow
from PIL import Image, ImageFilter

import imgtasks
from imgtasks.thumbnail import ORIGINAL, REENCODED, ThumbSettings, difference_hash, make_thumbnail


def image_bytes(size: tuple[int, int], fmt: str = "JPEG", mode: str = "RGB", **save) -> bytes:
    im = Image.linear_gradient("L").resize(size).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("size", "status"),
    [
        ((100, 40), "too_small"),
        ((40, 100), "too_small"),
        ((300, 60), "bad_aspect_ratio"),
        ((60, 300), "bad_aspect_ratio"),
        ((200, 100), "ok"),
        ((64, 64), "ok"),
    ],
)
def test_size_filters_refuse_from_the_header(size: tuple[int, int], status: str) -> None:
    settings = ThumbSettings(min_size=50, max_aspect_ratio=4.0)
    thumb = make_thumbnail(image_bytes(size), settings)
    assert thumb.status == status
    assert (thumb.orig_width, thumb.orig_height) == size  # recorded, refused or not
    if status != "ok":
        assert thumb.data is None and thumb.source_format == "JPEG"


@pytest.mark.parametrize(
    ("data", "settings", "kept"),
    [
        (image_bytes((100, 80)), ThumbSettings(keep_fitting=True), True),
        (
            image_bytes((100, 80), "PNG", "RGBA"),
            ThumbSettings(format="png", keep_fitting=True),
            True,
        ),
        (image_bytes((300, 80)), ThumbSettings(keep_fitting=True), False),  # resized
        (image_bytes((100, 80), "PNG"), ThumbSettings(keep_fitting=True), False),  # PNG -> JPEG
        (image_bytes((100, 80), mode="CMYK"), ThumbSettings(keep_fitting=True), False),
        (image_bytes((100, 80)), ThumbSettings(mode="pad", keep_fitting=True), False),
        (image_bytes((128, 128)), ThumbSettings(mode="pad", keep_fitting=True), True),
        (image_bytes((100, 80)), ThumbSettings(), False),  # off by default: EXIF stays private
    ],
)
def test_a_fitting_original_is_kept_byte_for_byte(data: bytes, settings, kept: bool) -> None:
    thumb = make_thumbnail(data, settings)
    assert thumb.ok
    assert (thumb.data == data) is kept
    assert thumb.encoding == (ORIGINAL if kept else REENCODED)


def test_the_difference_hash_is_64_bits_and_stable_under_reencoding() -> None:
    photo = Image.radial_gradient("L").convert("RGB").filter(ImageFilter.GaussianBlur(3))
    smaller = photo.resize((97, 97))
    shifted = Image.linear_gradient("L").convert("RGB")
    first = difference_hash(photo)
    assert len(first) == 16 and int(first, 16) >= 0
    assert _distance(first, difference_hash(smaller)) <= 4
    assert _distance(first, difference_hash(shifted)) > 10


def _distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def test_the_manifest_has_phash_and_encoding_and_the_filters_statuses(
    tmp_path: Path, demo_server
) -> None:
    urls = demo_server.urls(8)
    result = imgtasks.thumbnails(
        urls, tmp_path / "out", cluster="sync", thumb=ThumbSettings(min_size=10), progress=False
    )
    df = result.manifest()
    assert (df["status"] == "ok").all()
    assert df["phash"].str.fullmatch("[0-9a-f]{16}").all()
    assert (df["encoding"] == REENCODED).all()
    huge = imgtasks.thumbnails(
        urls, tmp_path / "o2", cluster="sync", thumb=ThumbSettings(min_size=100_000), progress=False
    )
    assert huge.counts == {"too_small": 8}
    assert (huge.manifest()["phash"] == "").all()


def test_the_command_line_maps_the_filter_flags(
    tmp_path: Path, demo_server, subprocess_env: dict[str, str]
) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(f"{demo_server.base_url}/tiny/{i}.jpg" for i in range(3)))
    base = ["--urls", str(listing), "--scheduler", "sync"]
    statuses = {}
    for name, flags in {
        "small": ["--min-size", "100000"],
        "fitting": ["--keep-fitting", "--size", "4000x4000"],
        "default": ["--size", "4000x4000"],
    }.items():
        proc = run_flow([*base, "--out", str(tmp_path / name), *flags], subprocess_env)
        assert proc.returncode == 0, proc.stderr
        df = pd.read_parquet(tmp_path / name / "manifest")
        statuses[name] = sorted(zip(df["status"], df["encoding"], strict=True))
    assert statuses["small"] == [("too_small", "")] * 3
    assert statuses["fitting"] == [("ok", ORIGINAL)] * 3  # tiny JPEGs fit: kept as they are
    assert statuses["default"] == [("ok", REENCODED)] * 3
    proc = run_flow([*base, "--out", str(tmp_path / "bad"), "--max-aspect-ratio", "0.5"])
    assert proc.returncode == 2 and "max_aspect_ratio" in proc.stderr, proc.stderr


def test_a_max_aspect_ratio_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        ThumbSettings(max_aspect_ratio=0.5)
