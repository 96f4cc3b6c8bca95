"""Image-quality helpers shared by the thumbnail tests and benchmark.

Kept out of :mod:`imgtasks.thumbnail` so the hot path stays small: nothing here is
used when making thumbnails, only when judging them. The test images come from the
corpus's synthesiser, `imgtasks.demo.corpus.photo_like`, re-exported here.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, ImageOps

from imgtasks.demo.corpus import photo_like

__all__ = ["encode", "photo_like", "pillow_thumbnail_size", "psnr", "reference_resize"]

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


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    """Encode ``im`` to bytes in Pillow format ``fmt`` (test/bench convenience)."""
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()
