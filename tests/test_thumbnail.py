"""Tests for imgtasks.thumbnail: geometry, colour modes, statuses and fast-path quality.

Every image is generated here (numpy + Pillow); big ones once per module.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, features

from imgtasks import thumbnail
from imgtasks.imagecheck import encode, photo_like, pillow_thumbnail_size, psnr, reference_resize
from imgtasks.thumbnail import (
    DEFAULT_THUMB,
    FORMATS,
    MODES,
    WEB_FORMATS,
    Thumbnail,
    ThumbSettings,
    available_formats,
    detected_format,
    fit_size,
    make_thumbnail,
    parse_formats,
    parse_size,
    render_thumbnail,
)

STATUSES = {
    "ok",
    "decode_error",
    "truncated_image",
    "too_many_pixels",
    "encode_error",
    "empty_body",
    "unsupported_format",
}
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
MIN_PSNR_DB = 35.0


# --------------------------------------------------------------------------- helpers


def decode(thumb: Thumbnail) -> Image.Image:
    assert thumb.ok, (thumb.status, thumb.error)
    assert thumb.data
    im = Image.open(io.BytesIO(thumb.data))
    im.load()
    return im


def patch_mean(im: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """Mean colour of ``box`` (RGB, or RGBA when the image has alpha)."""
    mode = "RGBA" if "A" in im.mode or "transparency" in im.info else "RGB"
    return np.asarray(im.convert(mode).crop(box), dtype=np.float64).mean(axis=(0, 1))


def assert_colour(actual: np.ndarray, expected: tuple[int, ...], tol: float = 14.0) -> None:
    assert np.all(np.abs(actual - np.array(expected)) <= tol), (actual, expected)


def jpeg(im: Image.Image, **params: object) -> bytes:
    return encode(im, "JPEG", quality=90, **params)


def with_orientation(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(im, exif=exif.tobytes())


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit all-black PNG written by hand: tiny file, huge pixel count, no big buffers."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photo_12mp() -> bytes:
    return jpeg(photo_like(4000, 3000, seed=12))


@pytest.fixture(scope="module")
def photo_1080() -> Image.Image:
    return photo_like(1920, 1080, seed=7)


@pytest.fixture(scope="module")
def small_photo() -> Image.Image:
    return photo_like(640, 480, seed=3)


@pytest.fixture(scope="module")
def rgba_png() -> bytes:
    """Left half fully transparent, right half opaque green."""
    im = Image.new("RGBA", (300, 200), (255, 0, 0, 0))
    im.paste((0, 255, 0, 255), (150, 0, 300, 200))
    return encode(im, "PNG")


# --------------------------------------------------------------------------- settings


def test_defaults() -> None:
    s = DEFAULT_THUMB
    assert (s.size, s.mode, s.format, s.quality) == ((128, 128), "fit", "jpeg", 90)
    assert (s.background, s.max_pixels) == ((255, 255, 255), 100_000_000)
    assert (s.ext, s.content_type) == ("jpg", "image/jpeg")
    assert ThumbSettings(format="png").ext == "png"
    assert ThumbSettings(format="webp").content_type == "image/webp"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "stretch"},
        {"format": "gif"},
        {"format": "JPEG"},
        {"size": (0, 128)},
        {"size": (128,)},
        {"size": (128.5, 128)},
        {"size": (100_000, 128)},
        {"quality": 0},
        {"quality": 101},
        {"background": (256, 0, 0)},
        {"background": (0, 0)},
        {"max_pixels": 0},
    ],
)
def test_bad_settings_raise_early(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ThumbSettings(**kwargs)  # type: ignore[arg-type]


def test_settings_accept_lists_from_config() -> None:
    s = ThumbSettings(size=[64, 32], background=[1, 2, 3])  # type: ignore[arg-type]
    assert s.size == (64, 32) and s.background == (1, 2, 3)
    hash(s)


@pytest.mark.parametrize(
    ("text", "size"), [("128x128", (128, 128)), ("320X200", (320, 200)), (" 64 x 48 ", (64, 48))]
)
def test_parse_size(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "128", "128x", "x128", "-1x5", "0x10", "1.5x2", "axb", "1x2x3"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"WIDTHxHEIGHT|size"):
        parse_size(text)


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_mode_and_format(small_photo: Image.Image, mode: str, fmt: str) -> None:
    settings = ThumbSettings(mode=mode, format=fmt)
    thumb = make_thumbnail(jpeg(small_photo), settings)
    out = decode(thumb)
    assert out.format == FORMATS[fmt][0]
    expected = (128, 96) if mode == "fit" else (128, 128)
    assert out.size == expected == (thumb.width, thumb.height)
    assert (thumb.orig_width, thumb.orig_height) == (640, 480)
    assert (thumb.source_format, thumb.format, thumb.error) == ("JPEG", fmt, "")
    assert thumb.elapsed_s > 0


@pytest.mark.parametrize(
    "size",
    [(1, 1), (2, 1), (127, 128), (129, 128), (1000, 999), (333, 77), (77, 333), (10000, 10),
     (10, 10000), (4000, 3000), (3000, 4000), (257, 129), (50, 40), (128, 128)],
)  # fmt: skip
@pytest.mark.parametrize("box", [(128, 128), (200, 100), (64, 300), (1, 1)])
def test_fit_size_matches_pillow_thumbnail(size: tuple[int, int], box: tuple[int, int]) -> None:
    assert fit_size(*size, box) == pillow_thumbnail_size(*size, box)


@pytest.mark.parametrize(
    ("size", "box"),
    [
        ((333, 77), (128, 128)),
        ((77, 333), (200, 100)),
        ((1001, 999), (128, 128)),
        ((50, 40), (128, 128)),
    ],
)
def test_fit_output_matches_pillow_thumbnail(size: tuple[int, int], box: tuple[int, int]) -> None:
    im = photo_like(*size, seed=1)
    out = decode(make_thumbnail(encode(im, "PNG"), ThumbSettings(size=box)))
    expected = im.copy()
    expected.thumbnail(box)
    assert out.size == expected.size


def test_fit_never_upscales() -> None:
    thumb = make_thumbnail(encode(photo_like(50, 40), "PNG"), DEFAULT_THUMB)
    assert (thumb.width, thumb.height) == (50, 40)


@pytest.mark.parametrize("box", [(128, 128), (200, 100), (60, 150)])
def test_crop_is_exactly_the_box(small_photo: Image.Image, box: tuple[int, int]) -> None:
    thumb = make_thumbnail(jpeg(small_photo), ThumbSettings(size=box, mode="crop"))
    assert decode(thumb).size == box


def test_crop_centre_crops_like_imageops_fit(small_photo: Image.Image) -> None:
    data = encode(small_photo, "PNG")
    out = render_thumbnail(data, ThumbSettings(size=(100, 100), mode="crop")).image
    expected = ImageOps.fit(small_photo, (100, 100), Image.Resampling.LANCZOS)
    assert psnr(out, expected) >= MIN_PSNR_DB


def test_crop_scales_tiny_images_up_to_the_box() -> None:
    im = Image.new("RGB", (20, 10), RED)
    out = decode(make_thumbnail(encode(im, "PNG"), ThumbSettings(mode="crop", format="png")))
    assert out.size == (128, 128)
    assert_colour(patch_mean(out, (0, 0, 128, 128)), RED, tol=1)


def test_pad_is_exactly_the_box_with_background_borders() -> None:
    im = Image.new("RGB", (400, 200), RED)
    settings = ThumbSettings(mode="pad", format="png", background=(10, 200, 30))
    out = decode(make_thumbnail(encode(im, "PNG"), settings))
    assert out.size == (128, 128)
    assert_colour(patch_mean(out, (0, 0, 128, 30)), (10, 200, 30), tol=0)  # top band
    assert_colour(patch_mean(out, (0, 100, 128, 128)), (10, 200, 30), tol=0)  # bottom band
    assert_colour(patch_mean(out, (0, 40, 128, 88)), RED, tol=0)  # the image itself


def test_pad_does_not_upscale_small_images() -> None:
    im = Image.new("RGB", (20, 10), RED)
    out = decode(make_thumbnail(encode(im, "PNG"), ThumbSettings(mode="pad", format="png")))
    assert out.size == (128, 128)
    assert_colour(patch_mean(out, (54, 59, 74, 69)), RED, tol=0)  # 20x10 in the centre
    assert_colour(patch_mean(out, (0, 0, 128, 50)), (255, 255, 255), tol=0)


def test_pad_with_alpha_is_transparent_for_png(rgba_png: bytes) -> None:
    out = decode(make_thumbnail(rgba_png, ThumbSettings(mode="pad", format="png")))
    assert out.mode == "RGBA" and out.size == (128, 128)
    assert patch_mean(out, (0, 0, 128, 15))[3] == 0  # border is transparent
    assert_colour(patch_mean(out, (100, 50, 120, 78)), (*GREEN, 255), tol=2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(1, 1), (10000, 10), (10, 10000)])
def test_degenerate_shapes(mode: str, size: tuple[int, int]) -> None:
    data = encode(Image.new("RGB", size, BLUE), "PNG")
    # PNG output: JPEG chroma subsampling would smear a 1-pixel line into the padding
    thumb = make_thumbnail(data, ThumbSettings(mode=mode, format="png"))
    out = decode(thumb)
    expected = {"fit": pillow_thumbnail_size(*size, (128, 128))}.get(mode, (128, 128))
    assert out.size == expected and min(out.size) >= 1
    # pad centres the image: pixel (63, 63) is image in all three shapes
    box = (63, 63, 64, 64) if mode == "pad" else (0, 0, *out.size)
    assert_colour(patch_mean(out, box), BLUE, tol=8)


def test_very_wide_jpeg_uses_draft_safely() -> None:
    thumb = make_thumbnail(jpeg(photo_like(10000, 16, seed=2)), DEFAULT_THUMB)
    assert (thumb.width, thumb.height) == (128, 1)


# --------------------------------------------------------------------------- orientation


def marked_image() -> Image.Image:
    """600x300 blue landscape with a red square in the file's top-left corner."""
    im = Image.new("RGB", (600, 300), BLUE)
    im.paste(RED, (0, 0, 120, 120))
    return im


# Where the file's top-left corner ends up once displayed (on a 128-px-tall output).
MARKER_CORNER = {6: "top-right", 3: "bottom-right", 8: "bottom-left", 1: "top-left"}


def corner_box(corner: str, size: tuple[int, int], side: int = 12) -> tuple[int, int, int, int]:
    w, h = size
    x0 = 0 if corner.endswith("left") else w - side
    y0 = 0 if corner.startswith("top") else h - side
    return x0, y0, x0 + side, y0 + side


@pytest.mark.parametrize("orientation", [6, 3, 8, 1])
@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_exif_orientation(orientation: int, fmt: str) -> None:
    data = with_orientation(marked_image(), orientation)
    thumb = make_thumbnail(data, ThumbSettings(format=fmt))
    out = decode(thumb)
    swapped = orientation in (6, 8)
    assert (thumb.orig_width, thumb.orig_height) == ((300, 600) if swapped else (600, 300))
    assert out.size == ((64, 128) if swapped else (128, 64))
    for corner in ("top-left", "top-right", "bottom-left", "bottom-right"):
        colour = RED if corner == MARKER_CORNER[orientation] else BLUE
        assert_colour(patch_mean(out, corner_box(corner, out.size)), colour, tol=40)


@pytest.mark.parametrize("orientation", [5, 6, 7, 8, 2, 4])
def test_exif_orientation_matches_exif_transpose(orientation: int) -> None:
    data = with_orientation(photo_like(800, 500, seed=4), orientation)
    out = render_thumbnail(data, DEFAULT_THUMB).image
    assert psnr(out, reference_resize(data, (128, 128))) >= MIN_PSNR_DB


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_exif_orientation_with_crop_and_pad(mode: str) -> None:
    data = with_orientation(marked_image(), 6)
    out = decode(make_thumbnail(data, ThumbSettings(size=(200, 100), mode=mode)))
    assert out.size == (200, 100)
    if mode == "crop":  # displayed 300x600 portrait, centre band: no red, all blue
        assert_colour(patch_mean(out, (0, 0, 200, 100)), BLUE, tol=20)


# --------------------------------------------------------------------------- colour modes


def test_cmyk_jpeg() -> None:
    data = jpeg(Image.new("RGB", (300, 200), (200, 60, 40)).convert("CMYK"))
    thumb = make_thumbnail(data, ThumbSettings(format="png"))
    out = decode(thumb)
    assert out.mode == "RGB" and thumb.source_format == "JPEG"
    assert_colour(patch_mean(out, (0, 0, *out.size)), (200, 60, 40), tol=10)


def test_16bit_png_is_scaled_not_clipped() -> None:
    pixels = np.full((200, 300), 32768, dtype=np.uint16)
    pixels[:, 150:] = 65535
    data = encode(Image.fromarray(pixels), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode(make_thumbnail(data, ThumbSettings(format="png")))
    assert out.size == (128, 85)
    assert_colour(patch_mean(out, (0, 0, 50, 85)), (128, 128, 128), tol=2)
    assert_colour(patch_mean(out, (80, 0, 128, 85)), (255, 255, 255), tol=2)


def test_32bit_int_image() -> None:
    pixels = np.full((100, 100), 1000, dtype=np.int32)
    data = encode(Image.fromarray(pixels, "I"), "TIFF")  # PNG cannot hold 32-bit grey
    out = decode(make_thumbnail(data, ThumbSettings(format="png", source_formats=["TIFF"])))
    assert_colour(patch_mean(out, (0, 0, 100, 100)), (4, 4, 4), tol=1)


def palette_image(transparent: bool) -> bytes:
    """Left half index 0 (red), right half index 1 (green); index 0 transparent if asked."""
    im = Image.new("P", (200, 100), 0)
    im.putpalette([*RED, *GREEN] + [0, 0, 0] * 254)
    im.paste(1, (100, 0, 200, 100))
    return encode(im, "PNG", **({"transparency": 0} if transparent else {}))


def test_palette_png() -> None:
    out = decode(make_thumbnail(palette_image(False), ThumbSettings(format="png")))
    assert out.mode == "RGB"
    assert_colour(patch_mean(out, (0, 0, 50, 64)), RED, tol=0)
    assert_colour(patch_mean(out, (78, 0, 128, 64)), GREEN, tol=0)


def test_palette_transparency_keeps_alpha_in_png() -> None:
    out = decode(make_thumbnail(palette_image(True), ThumbSettings(format="png")))
    assert out.mode == "RGBA"
    assert patch_mean(out, (0, 0, 50, 64))[3] == 0
    assert_colour(patch_mean(out, (78, 0, 128, 64)), (*GREEN, 255), tol=0)


def test_palette_transparency_composited_for_jpeg() -> None:
    settings = ThumbSettings(background=BLUE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's "convert P+bytes to RGBA" must not fire
        out = decode(make_thumbnail(palette_image(True), settings))
    assert_colour(patch_mean(out, (0, 0, 50, 64)), BLUE)
    assert_colour(patch_mean(out, (78, 0, 128, 64)), GREEN)


def test_rgba_transparent_pixels_become_background_in_jpeg(rgba_png: bytes) -> None:
    out = decode(make_thumbnail(rgba_png, ThumbSettings(background=(0, 0, 255))))
    assert out.mode == "RGB"
    assert_colour(patch_mean(out, (0, 0, 50, 85)), BLUE)
    assert_colour(patch_mean(out, (78, 0, 128, 85)), GREEN)


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_rgba_keeps_alpha_for_png_and_webp(rgba_png: bytes, fmt: str) -> None:
    out = decode(make_thumbnail(rgba_png, ThumbSettings(format=fmt)))
    assert out.mode == "RGBA"
    assert patch_mean(out, (0, 0, 50, 85))[3] <= 1
    assert patch_mean(out, (78, 0, 128, 85))[3] >= 254


def test_la_png() -> None:
    im = Image.new("LA", (200, 100), (200, 0))
    im.paste((200, 255), (100, 0, 200, 100))
    data = encode(im, "PNG")
    jpg = decode(make_thumbnail(data, ThumbSettings(background=RED)))
    assert_colour(patch_mean(jpg, (0, 0, 50, 64)), RED)
    assert_colour(patch_mean(jpg, (78, 0, 128, 64)), (200, 200, 200))
    png = decode(make_thumbnail(data, ThumbSettings(format="png")))
    assert png.mode == "RGBA" and patch_mean(png, (0, 0, 50, 64))[3] == 0


def test_grey_and_1bit() -> None:
    grey = decode(make_thumbnail(encode(Image.new("L", (300, 300), 90), "PNG")))
    assert grey.mode == "RGB"
    assert_colour(patch_mean(grey, (0, 0, 128, 128)), (90, 90, 90), tol=3)
    bilevel = Image.new("1", (300, 300), 0)
    bilevel.paste(1, (150, 0, 300, 300))
    out = decode(make_thumbnail(encode(bilevel, "PNG"), ThumbSettings(format="png")))
    assert_colour(patch_mean(out, (0, 0, 50, 128)), (0, 0, 0), tol=0)
    assert_colour(patch_mean(out, (78, 0, 128, 128)), (255, 255, 255), tol=0)


@pytest.mark.parametrize("container", ["GIF", "WEBP"])
def test_animation_uses_first_frame(container: str) -> None:
    frames = [Image.new("RGB", (160, 120), c) for c in (RED, GREEN, BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, container, save_all=True, append_images=frames[1:], duration=100, loop=0)
    thumb = make_thumbnail(buf.getvalue(), ThumbSettings(format="png"))
    assert thumb.source_format == container
    assert_colour(patch_mean(decode(thumb), (0, 0, 128, 96)), RED, tol=6)


def test_progressive_jpeg(photo_1080: Image.Image) -> None:
    data = jpeg(photo_1080, progressive=True)
    assert Image.open(io.BytesIO(data)).info.get("progressive")
    out = render_thumbnail(data, DEFAULT_THUMB).image
    assert out.size == (128, 72)
    assert psnr(out, reference_resize(data, (128, 128))) >= MIN_PSNR_DB


def test_content_decoded_whatever_its_origin(small_photo: Image.Image) -> None:
    for fmt in ("PNG", "WEBP", "GIF", "BMP"):
        thumb = make_thumbnail(encode(small_photo, fmt))
        assert thumb.ok and thumb.source_format == fmt, (fmt, thumb.error)


# --------------------------------------------------------------------------- statuses


@pytest.mark.parametrize(
    "data",
    [b"<!doctype html><html><body>Not found</body></html>", b"\x00" * 500, b"GIF89a" + b"\0" * 9],
)
def test_not_an_image_is_decode_error(data: bytes) -> None:
    thumb = make_thumbnail(data)
    assert (thumb.ok, thumb.status, thumb.data) == (False, "decode_error", None)
    assert thumb.error and "0x" not in thumb.error  # no BytesIO address in the manifest


def test_random_bytes_are_decode_error() -> None:
    data = np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert make_thumbnail(data).status == "decode_error"


def test_empty_body() -> None:
    thumb = make_thumbnail(b"")
    assert (thumb.ok, thumb.status, thumb.format) == (False, "empty_body", "jpeg")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_image(small_photo: Image.Image, fmt: str, keep: float) -> None:
    data = encode(small_photo, fmt)
    thumb = make_thumbnail(data[: int(len(data) * keep)])
    assert thumb.status == "truncated_image", thumb.error
    assert thumb.data is None and thumb.source_format == fmt
    assert (thumb.orig_width, thumb.orig_height) == (640, 480)  # not the draft size
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_cut_progressive_jpeg_is_truncated(photo_1080: Image.Image) -> None:
    data = jpeg(photo_1080, progressive=True)
    assert make_thumbnail(data[: len(data) // 3]).status == "truncated_image"


@pytest.mark.parametrize(
    ("size", "reported"), [((12000, 10000), (12000, 10000)), ((20000, 20000), None)]
)
def test_bomb_refused_before_decoding(
    size: tuple[int, int], reported: tuple[int, int] | None
) -> None:
    # 120 MP is past Pillow's warning threshold, 400 MP past its error threshold.
    data = png_bomb(*size)
    assert len(data) < 200_000
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        thumb = make_thumbnail(data)
    assert thumb.status == "too_many_pixels", thumb.error
    assert thumb.elapsed_s < 1.0  # refused from the header, not after decoding
    if reported:
        assert (thumb.orig_width, thumb.orig_height) == reported
    assert before == Image.MAX_IMAGE_PIXELS


def test_max_pixels_is_configurable(small_photo: Image.Image) -> None:
    data = jpeg(small_photo)
    thumb = make_thumbnail(data, ThumbSettings(max_pixels=640 * 480 - 1))
    assert thumb.status == "too_many_pixels" and "max_pixels" in thumb.error
    assert (thumb.orig_width, thumb.orig_height) == (640, 480)
    assert make_thumbnail(data, ThumbSettings(max_pixels=640 * 480)).ok


def test_warnings_filters_left_alone(small_photo: Image.Image) -> None:
    before = list(warnings.filters)
    make_thumbnail(png_bomb(12000, 10000))
    make_thumbnail(jpeg(small_photo))
    assert warnings.filters == before


def test_never_raises_on_corrupted_images(small_photo: Image.Image) -> None:
    rng = random.Random(1234)
    originals = [encode(small_photo.resize((160, 120)), f) for f in ("JPEG", "PNG", "GIF", "WEBP")]
    seen = set()
    for i in range(160):
        data = bytearray(originals[i % len(originals)])
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        thumb = make_thumbnail(bytes(data), ThumbSettings(mode=MODES[i % 3]))
        assert thumb.status in STATUSES
        assert thumb.ok == (thumb.status == "ok") and (thumb.data is not None) == thumb.ok
        seen.add(thumb.status)
    assert "ok" in seen and len(seen) >= 2


# --------------------------------------------------------------------------- source formats

# Formats a browser would not show, each with how to write a small sample of it.
REFUSED = ("TGA", "PCX", "SGI", "DDS", "ICNS", "PSD", "TIFF", "JPEG2000", "QOI", "PPM", "IM")


def psd(width: int, height: int, rgb: tuple[int, int, int] = RED) -> bytes:
    """A minimal RGB Photoshop file (Pillow reads PSD but cannot write it)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, resources, layers
    planes = b"".join(bytes([value]) * (width * height) for value in rgb)
    return header + sections + struct.pack(">H", 0) + planes  # compression 0: raw


def sample(fmt: str) -> bytes:
    """A small red image in ``fmt``."""
    if fmt == "PSD":
        return psd(48, 32)
    im = Image.new("RGB", (48, 32), RED)
    if fmt == "MPO":  # a JPEG with a second frame
        return encode(im, "MPO", save_all=True, append_images=[Image.new("RGB", (48, 32))])
    return encode(im, fmt)


def widened(*extra: str) -> ThumbSettings:
    return ThumbSettings(source_formats=(*WEB_FORMATS, *extra))


def test_default_formats_are_the_web_ones() -> None:
    assert DEFAULT_THUMB.source_formats == WEB_FORMATS
    assert {"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP"} <= set(WEB_FORMATS)
    # AVIF only when this Pillow can decode it.
    assert ("AVIF" in WEB_FORMATS) == features.check_module("avif")


@pytest.mark.parametrize("fmt", [*sorted(set(WEB_FORMATS) - {"AVIF"}), "AVIF"])
def test_web_formats_decode_by_default(fmt: str) -> None:
    if fmt not in WEB_FORMATS:
        pytest.skip("this Pillow has no AVIF support")
    thumb = make_thumbnail(sample(fmt))
    assert (thumb.status, thumb.source_format) == ("ok", fmt), thumb.error
    assert_colour(patch_mean(decode(thumb), (4, 4, 40, 24)), RED, tol=20)


@pytest.mark.parametrize("fmt", REFUSED)
def test_other_formats_are_refused_by_default(fmt: str) -> None:
    thumb = make_thumbnail(sample(fmt))
    assert (thumb.ok, thumb.status, thumb.source_format) == (False, "unsupported_format", fmt)
    assert f"format {fmt} is not in the allowed formats" in thumb.error
    assert (thumb.orig_width, thumb.orig_height, thumb.data) == (0, 0, None)
    assert detected_format(sample(fmt)) == fmt


@pytest.mark.parametrize("fmt", REFUSED)
def test_widened_formats_decode(fmt: str) -> None:
    for settings in (widened(fmt), ThumbSettings(source_formats=parse_formats("all"))):
        thumb = make_thumbnail(sample(fmt), settings)
        assert (thumb.status, thumb.source_format) == ("ok", fmt), thumb.error
        assert_colour(patch_mean(decode(thumb), (4, 4, 30, 20)), RED, tol=20)


def test_eps_only_when_named() -> None:
    """EPS loads through Ghostscript: never part of "all", opened only when named."""
    data = sample("EPS")
    assert "EPS" not in parse_formats("all") and "EPS" in available_formats()
    for settings in (DEFAULT_THUMB, ThumbSettings(source_formats="all")):
        thumb = make_thumbnail(data, settings)
        assert (thumb.status, thumb.source_format) == ("unsupported_format", "EPS")
    for text in ("eps", "all,eps", "web,EPS"):
        thumb = make_thumbnail(data, ThumbSettings(source_formats=parse_formats(text)))
        # ok with Ghostscript installed; without it the open works and the load fails
        assert thumb.status != "unsupported_format" and thumb.source_format == "EPS"


def test_only_jpeg_refuses_other_web_formats() -> None:
    jpeg_only = ThumbSettings(source_formats=["jpeg"])
    assert jpeg_only.source_formats == ("JPEG", "MPO")  # an MPO is a JPEG with extra frames
    assert make_thumbnail(sample("MPO"), jpeg_only).ok
    thumb = make_thumbnail(sample("PNG"), jpeg_only)
    assert (thumb.status, thumb.source_format) == ("unsupported_format", "PNG")
    thumb = make_thumbnail(sample("JPEG"), ThumbSettings(source_formats=["MPO"]))
    assert (thumb.status, thumb.source_format) == ("unsupported_format", "JPEG")


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (["png", " Gif "], ("GIF", "PNG")),
        (("TIFF", "tiff"), ("TIFF",)),
        ("bmp,jpeg", ("BMP", "JPEG", "MPO")),
        ("web", WEB_FORMATS),
    ],
)
def test_source_formats_normalised(given: object, stored: tuple[str, ...]) -> None:
    settings = ThumbSettings(source_formats=given)  # type: ignore[arg-type]
    assert settings.source_formats == stored
    hash(settings)


def test_parse_formats() -> None:
    assert parse_formats("PNG, jpeg,,") == ("JPEG", "MPO", "PNG")
    everything = parse_formats("all")
    assert set(everything) == set(available_formats()) - {"EPS"}
    assert {"TGA", "TIFF", "PSD", "JPEG", "MPO"} <= set(everything)
    assert parse_formats("all,eps") == available_formats()


@pytest.mark.parametrize("given", [["JPEG", "NOPE"], [], "", " , ", "jpeg,pdf", 5, ["PALM"]])
def test_bad_source_formats_raise(given: object) -> None:
    with pytest.raises(ValueError) as caught:
        ThumbSettings(source_formats=given)  # type: ignore[arg-type]
    if given and not isinstance(given, int):
        assert "Pillow has: " in str(caught.value) and "JPEG" in str(caught.value)


def test_refused_format_is_never_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """No pixel of a refused file is read: no load(), no decoder. A PCX cut inside its
    pixels would otherwise be truncated_image."""
    loaded: list[str | None] = []
    decoders: list[str] = []
    real_load, real_decoder = ImageFile.ImageFile.load, Image._getdecoder

    def spy_load(self: ImageFile.ImageFile) -> object:
        loaded.append(self.format)
        return real_load(self)

    def spy_decoder(mode: str, decoder_name: str, *args: object) -> object:
        decoders.append(decoder_name)
        return real_decoder(mode, decoder_name, *args)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    monkeypatch.setattr(Image, "_getdecoder", spy_decoder)
    cut_pcx = sample("PCX")[:140]
    for data in (cut_pcx, sample("TGA"), sample("TIFF"), psd(8, 8), sample("DDS")):
        assert make_thumbnail(data).status == "unsupported_format"
    assert (loaded, decoders) == ([], [])
    assert make_thumbnail(cut_pcx, widened("PCX")).status == "truncated_image"
    assert loaded == ["PCX"] and decoders


def test_bomb_check_parses_allowed_headers_only() -> None:
    bomb = png_bomb(20000, 20000)  # past Pillow's error threshold: sized from the header
    thumb = make_thumbnail(bomb)
    assert (thumb.status, thumb.orig_width, thumb.source_format) == (
        "too_many_pixels",
        20000,
        "PNG",
    )
    refused = make_thumbnail(bomb, ThumbSettings(source_formats=["tiff"]))
    assert (refused.status, refused.source_format) == ("unsupported_format", "PNG")
    assert (refused.orig_width, refused.orig_height) == (0, 0)


def test_webp_bomb_keeps_its_format() -> None:
    """WebP checks the pixel count inside its own header parse: still named WEBP."""
    data = bytearray(encode(Image.new("RGB", (48, 32), RED), "WEBP"))
    assert data[12:16] == b"VP8 "
    struct.pack_into("<HH", data, 26, 16383, 16383)  # the frame header's 14-bit sizes
    thumb = make_thumbnail(bytes(data))
    assert (thumb.status, thumb.source_format) == ("too_many_pixels", "WEBP")


def test_oversized_png_transparency_is_cut_to_the_palette() -> None:
    """A tRNS chunk with more alphas than a palette holds: Pillow loads it but refuses to
    convert it; browsers ignore the excess (found by test_torture)."""
    im = Image.new("P", (200, 100), 0)
    im.putpalette([*RED, *GREEN] + [0, 0, 0] * 254)
    im.paste(1, (100, 0, 200, 100))
    png = encode(im, "PNG")
    at = png.index(b"IDAT") - 4
    # Index 0 almost transparent, then 299 alphas too many. No zero byte: Pillow reads a
    # tRNS with one as "that index is transparent" and ignores the rest.
    alphas = b"\x01" + b"\xff" * 299
    trns = struct.pack(">I", len(alphas)) + b"tRNS" + alphas
    trns += struct.pack(">I", zlib.crc32(b"tRNS" + alphas) & 0xFFFFFFFF)
    thumb = make_thumbnail(png[:at] + trns + png[at:], ThumbSettings(format="png"))
    out = decode(thumb)
    assert patch_mean(out, (0, 0, 50, 64))[3] <= 1
    assert_colour(patch_mean(out, (78, 0, 128, 64)), (*GREEN, 255), tol=0)


def test_broken_header_of_an_allowed_format_is_decode_error() -> None:
    thumb = make_thumbnail(b"GIF89a" + b"\0" * 9)
    assert (thumb.status, thumb.source_format) == ("decode_error", "GIF")
    thumb = make_thumbnail(b"<!doctype html><html><body>Not found</body></html>")
    assert (thumb.status, thumb.source_format, thumb.error) == (
        "decode_error",
        "",
        "not a recognised image format",
    )


# --------------------------------------------------------------------------- fast path quality


def test_12mp_jpeg_uses_dct_scaling_and_stays_accurate(
    photo_12mp: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    drafts: list[tuple[int, int]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None):  # type: ignore[no-untyped-def]
        result = real_draft(self, mode, size)
        drafts.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    rendered = render_thumbnail(photo_12mp, DEFAULT_THUMB)
    assert drafts == [(500, 375)]  # decoded at 1/8 scale: 256x192 target with slack
    assert rendered.image.size == (128, 96)
    assert psnr(rendered.image, reference_resize(photo_12mp, (128, 128))) >= MIN_PSNR_DB


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("box", [(128, 128), (256, 256)])
def test_fast_path_psnr_1080p(photo_1080: Image.Image, fmt: str, box: tuple[int, int]) -> None:
    data = encode(photo_1080, fmt, quality=90)
    out = render_thumbnail(data, ThumbSettings(size=box)).image
    assert psnr(out, reference_resize(data, box)) >= MIN_PSNR_DB


def test_fast_path_psnr_crop_12mp(photo_12mp: bytes) -> None:
    out = render_thumbnail(photo_12mp, ThumbSettings(size=(128, 128), mode="crop")).image
    with Image.open(io.BytesIO(photo_12mp)) as im:
        expected = ImageOps.fit(im.convert("RGB"), (128, 128), Image.Resampling.LANCZOS)
    assert psnr(out, expected) >= MIN_PSNR_DB


def test_fast_path_psnr_rgba_png_composited() -> None:
    im = photo_like(900, 600, seed=9).convert("RGBA")
    alpha = np.asarray(photo_like(900, 600, seed=10).convert("L"))  # smooth, varied alpha
    im.putalpha(Image.fromarray(alpha, "L"))
    data = encode(im, "PNG")
    out = render_thumbnail(data, DEFAULT_THUMB).image
    assert out.mode == "RGB"
    assert psnr(out, reference_resize(data, (128, 128))) >= MIN_PSNR_DB


def test_psnr_helper() -> None:
    a = photo_like(64, 48, seed=1)
    assert psnr(a, a.copy()) == float("inf")
    assert psnr(a, Image.new("RGB", a.size)) < 15
    with pytest.raises(ValueError, match="size mismatch"):
        psnr(a, a.resize((32, 24)))


def test_encode_failure_is_a_status(
    small_photo: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = jpeg(small_photo)

    def broken_save(self: Image.Image, *args: object, **kwargs: object) -> None:
        raise OSError("encoder exploded")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    thumb = make_thumbnail(data)
    assert (thumb.ok, thumb.status, thumb.data) == (False, "encode_error", None)
    assert "encoder exploded" in thumb.error
    assert (thumb.orig_width, thumb.orig_height, thumb.source_format) == (640, 480, "JPEG")


def test_unexpected_errors_never_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    import imgtasks.thumbnail as thumbnail

    def bug(*args: object) -> None:
        raise TypeError("a bug")

    monkeypatch.setattr(thumbnail, "_encode", bug)
    thumb = make_thumbnail(encode(Image.new("RGB", (8, 8)), "PNG"))
    assert (thumb.ok, thumb.status) == (False, "decode_error")
    assert "a bug" in thumb.error


# --------------------------------------------------------------------------- WebP through libwebp


@functools.cache
def webp_cases() -> dict[str, bytes]:
    """Still WebPs of every kind Pillow writes: lossy and lossless, with and without
    alpha, grey, EXIF-rotated."""
    photo = photo_like(400, 300, seed=21)
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.asarray(photo_like(400, 300, seed=22).convert("L")), "L"))
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "lossy": encode(photo, "WEBP", quality=85),
        "lossless": encode(photo, "WEBP", lossless=True),
        "lossy alpha": encode(rgba, "WEBP", quality=85),
        "lossless alpha": encode(rgba, "WEBP", lossless=True),
        "grey": encode(photo.convert("L"), "WEBP", quality=85),
        "rotated": encode(photo, "WEBP", quality=85, exif=exif.tobytes()),
    }


@pytest.fixture
def webp_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the decodes that went through libwebp's WebPDecode (imagecodecs)."""
    calls: list[int] = []
    real = thumbnail.imagecodecs.webp_decode

    def counted(data: bytes, **kwargs: object) -> np.ndarray:
        calls.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(thumbnail.imagecodecs, "webp_decode", counted)
    return calls


def pillow_decoded(data: bytes, settings: ThumbSettings) -> Thumbnail:
    """The thumbnail as Pillow's own WebP decoding makes it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(thumbnail, "_webp_pixels", lambda data, im: None)
        return make_thumbnail(data, settings)


@pytest.mark.parametrize("case", list(webp_cases()))
@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
@pytest.mark.parametrize("mode", ["fit", "crop"])
def test_still_webp_decoded_by_libwebp_as_pillow_would(
    webp_calls: list[int], case: str, fmt: str, mode: str
) -> None:
    data, settings = webp_cases()[case], ThumbSettings(format=fmt, mode=mode)
    thumb = make_thumbnail(data, settings)
    assert webp_calls == [len(data)]
    expected = pillow_decoded(data, settings)
    assert thumb.ok and expected.ok
    assert thumb.data == expected.data  # the same pixels, so the same encoded bytes
    assert (thumb.width, thumb.height, thumb.orig_width, thumb.orig_height) == (
        expected.width,
        expected.height,
        expected.orig_width,
        expected.orig_height,
    )
    assert thumb.phash == expected.phash and thumb.source_format == "WEBP"


def test_animated_webp_is_left_to_pillow(webp_calls: list[int]) -> None:
    frames = [Image.new("RGB", (160, 120), c) for c in (RED, GREEN, BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    thumb = make_thumbnail(buf.getvalue(), ThumbSettings(format="png"))
    assert webp_calls == []
    assert_colour(patch_mean(decode(thumb), (0, 0, 128, 96)), RED, tol=6)


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_truncated_webp_gets_pillows_status(webp_calls: list[int], cut: float) -> None:
    """What libwebp refuses is decoded again by Pillow, whose error names the status."""
    data = webp_cases()["lossy"]
    data = data[: int(len(data) * cut)]
    thumb = make_thumbnail(data)
    assert thumb.status == pillow_decoded(data, DEFAULT_THUMB).status
    assert not thumb.ok and thumb.status in ("truncated_image", "decode_error")


def test_webp_frame_other_than_its_header_is_left_to_pillow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pixels of another size than the header's (whose pixel count was checked) are not
    used: Pillow decodes the file instead."""
    data = webp_cases()["lossy"]
    monkeypatch.setattr(
        thumbnail.imagecodecs, "webp_decode", lambda data, **kw: np.zeros((600, 800, 4), np.uint8)
    )
    thumb = make_thumbnail(data)
    assert thumb.ok and thumb.data == pillow_decoded(data, DEFAULT_THUMB).data
