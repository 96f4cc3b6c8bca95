"""Image-quality helpers shared by the thumbnail tests and benchmark.

Kept out of :mod:`imgtasks.thumbnail` so the hot path stays small: nothing here is
used when making thumbnails, only when judging them.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, ImageDraw, ImageOps

logger = logging.getLogger(__name__)


def pillow_thumbnail_size(width: int, height: int, box: tuple[int, int]) -> tuple[int, int]:
    """Output size of ``PIL.Image.thumbnail`` for a ``width`` x ``height`` image, asked of
    Pillow itself: the oracle that ``imgtasks.thumbnail.fit_size``'s arithmetic is checked
    against."""
    probe = Image.new("1", (width, height))
    probe.thumbnail(box)
    return probe.size


def reference_resize(
    data: bytes, size: tuple[int, int], background: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Slow, careful reference: full decode, EXIF orientation, RGB, one LANCZOS pass.

    Alpha is composited on ``background`` at full size (what a JPEG thumbnail shows).
    The output has the same dimensions as ``PIL.Image.thumbnail`` would give (fit in
    ``size``, never upscaled), so it can be compared pixel for pixel with a fast path.
    """
    with Image.open(io.BytesIO(data)) as im:
        oriented = ImageOps.exif_transpose(im)
    rgb = _flatten(oriented, background)
    target = pillow_thumbnail_size(rgb.width, rgb.height, size)
    if target == rgb.size:
        return rgb
    return rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=None)


def _flatten(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode not in ("RGBA", "LA", "PA", "RGBa", "La"):
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, background)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB of two same-size images (``inf`` if identical)."""
    if a.size != b.size:
        raise ValueError(f"size mismatch: {a.size} vs {b.size}")
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(255.0**2 / mse))


def _upsampled(
    rng: np.random.Generator, grid: tuple[int, int], size: tuple[int, int]
) -> Image.Image:
    """Random colours on a coarse grid, bicubic-upsampled: low-frequency structure."""
    coarse = rng.integers(0, 256, size=(grid[1], grid[0], 3), dtype=np.uint8)
    return Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC)


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with photo statistics: gradients, blobs, some edges.

    Not random per-pixel noise (which no real photo looks like and which makes every
    resampler look bad); instead smooth noise at two scales over a gradient plus a
    few hard-edged shapes. Built from uint8 Pillow ops so 12 MP takes well under 1 s.
    """
    rng = np.random.default_rng(seed)
    size = (width, height)
    # Four random corner colours stretched bilinearly: a smooth gradient.
    corners = rng.integers(0, 256, size=(2, 2, 3), dtype=np.uint8)
    gradient = Image.fromarray(corners, "RGB").resize(size, Image.Resampling.BILINEAR)
    coarse = _upsampled(rng, (6, 5), size)
    detail = _upsampled(rng, (max(2, width // 24), max(2, height // 24)), size)
    im = Image.blend(Image.blend(gradient, coarse, 0.55), detail, 0.2)
    _draw_shapes(im, rng)
    return im


def _draw_shapes(im: Image.Image, rng: np.random.Generator) -> None:
    """A few filled shapes: the sharp edges photos have at object boundaries."""
    draw = ImageDraw.Draw(im)
    w, h = im.size
    for _ in range(6):
        x0, x1 = sorted(int(v) for v in rng.integers(0, max(w, 2), 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, max(h, 2), 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=colour)


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    """Encode ``im`` to bytes in Pillow format ``fmt`` (test/bench convenience)."""
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()
