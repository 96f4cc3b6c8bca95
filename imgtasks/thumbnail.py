"""Image bytes in, encoded thumbnail plus metadata out.

:func:`make_thumbnail` is a pure function that never raises for any input bytes: every
per-image failure comes back as a :class:`Thumbnail` with a ``status`` (see
``docs/architecture.md``). Only bad :class:`ThumbSettings` raise, at construction.

The fast path, in order (each step is cheap only because of the one before):

1. ``Image.open`` reads the header only; the pixel count is checked against
   ``max_pixels`` here, before a single pixel is decoded.
2. ``Image.draft`` asks libjpeg to decode at 1/2, 1/4 or 1/8 scale (DCT scaling), at
   the smallest scale that still covers the output size (``DRAFT_GAP``).
   It must come before ``load()`` and before any ``convert()``: converting first
   decodes the full-size image and roughly halves throughput.
3. ``resize(..., reducing_gap=REDUCING_GAP)`` does an integer box ``reduce()`` first
   and a LANCZOS pass over what is left (this is what keeps PNG/WebP/GIF cheap).
4. Colour conversion, EXIF orientation and padding happen on the small image.

Size modes (``ThumbSettings.mode``):

- ``fit``: keep the aspect ratio inside the box, never upscale; same output size as
  ``PIL.Image.thumbnail``.
- ``crop``: scale so the box is *covered*, centre-crop to exactly the box (like
  ``ImageOps.fit``). Images smaller than the box are scaled UP so the output is always
  exactly the box size.
- ``pad``: ``fit`` (never upscale), then centre on exactly the box, filling with
  ``background`` (or transparent for PNG/WebP output of images with alpha).

Source formats (``ThumbSettings.source_formats``, default :data:`WEB_FORMATS`): only
those plugins may open the bytes. Anything else Pillow recognises is refused as
``unsupported_format``, named from its header, never decoded: each rare plugin's decoder
(C code, rarely fuzzed) is attack surface that web images do not need.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import imagecodecs
import numpy as np
from PIL import Image, ImageFile, features

from imgtasks.status import Status

logger = logging.getLogger(__name__)

MODES = ("fit", "crop", "pad")
# settings.format -> (Pillow format, file extension, content type)
FORMATS: dict[str, tuple[str, str, str]] = {
    "jpeg": ("JPEG", "jpg", "image/jpeg"),
    "png": ("PNG", "png", "image/png"),
    "webp": ("WEBP", "webp", "image/webp"),
}
MAX_SIDE = 8192  # a thumbnail box larger than this is a configuration mistake
# resize(): integer reduce() (a box average) stops at >= this many times the output. 1.0
# as for JPEG's draft below: on the demo corpus's web-size PNGs and WebPs (512 px to 128
# px) it renders in 1.68 / 3.50 ms instead of 2.46 / 4.53 (medians), PSNR against a
# full-size LANCZOS reference 45.7 / 46.4 dB mean (min 43.1) instead of 52.5 / 52.8, and
# after the quality-90 encoding 33.17 / 33.63 dB instead of 33.32 / 33.82 (2026-12-01).
REDUCING_GAP = 1.0
# draft(): decode at >= this many times the output size. No slack is needed: DCT scaling
# filters properly, and the JPEG encoding of the thumbnail loses far more than the last
# resample gains. Measured on the 240 web-size
# JPEGs of the demo corpus (512 px to 128 px): 1.0 instead of 1.5 renders in 0.63 ms
# instead of 1.43 (a 512 px side now decodes at 1/4, not 1/2, and LANCZOS has nothing
# left to do); PSNR against a full-size LANCZOS reference 44.5 dB mean (min 40.6)
# instead of 50.2, and after the quality-90 encoding 33.8 dB instead of 34.0.
DRAFT_GAP = 1.0
RESAMPLE = Image.Resampling.LANCZOS

# The formats browsers display and image hosts serve. AVIF only when this Pillow was built
# with libavif (its plugin registers itself either way but cannot decode without it).
_HAS_AVIF = "avif" in features.modules and bool(features.check_module("avif"))
WEB_FORMATS: tuple[str, ...] = tuple(
    sorted({"BMP", "GIF", "JPEG", "MPO", "PNG", "WEBP"} | ({"AVIF"} if _HAS_AVIF else set()))
)
# Plugins that run an external program: EPS (PostScript) loads through Ghostscript when it
# is installed. "all" leaves them out; they open only when named.
EXTERNAL_PROGRAM_FORMATS = frozenset({"EPS"})
# Formats that no plugin registers under their own name: the JPEG plugin returns MPO
# (JPEG plus extra frames; browsers show the first), so allowing JPEG allows MPO too.
_OPENED_BY = {"MPO": "JPEG"}

_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
# Substrings of Pillow's messages when the data simply ends early.
_TRUNCATION_HINTS = ("truncated", "broken data stream", "premature end", "unexpected end")

# warnings.catch_warnings swaps process-global state; serialise our own uses of it so
# concurrent threads in this module cannot restore each other's filters out of order.
_WARNINGS_LOCK = threading.Lock()


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"128x128"`` (also ``X`` or ``×``) into ``(128, 128)``; ValueError if bad."""
    parts = text.strip().lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"thumbnail size must look like WIDTHxHEIGHT, e.g. 128x128; got {text!r}")
    width, height = (int(p) for p in parts)
    _check_size((width, height))
    return width, height


def _check_size(size: tuple[int, int]) -> None:
    ok = len(size) == 2 and all(isinstance(v, int) and 1 <= v <= MAX_SIDE for v in size)
    if not ok:
        raise ValueError(f"thumbnail size must be two integers in 1..{MAX_SIDE}; got {size!r}")


def available_formats() -> tuple[str, ...]:
    """Every source format id this Pillow can open, sorted (``MPO`` included)."""
    Image.init()
    names = set(Image.OPEN) | set(_OPENED_BY)
    if not _HAS_AVIF:
        names.discard("AVIF")
    return tuple(sorted(names))


def parse_formats(text: str) -> tuple[str, ...]:
    """``"jpeg,png"`` -> ``("JPEG", "MPO", "PNG")``, for ``--formats``; ValueError if bad.

    Comma-separated Pillow format ids, any case, plus two words: ``web`` (the default,
    :data:`WEB_FORMATS`) and ``all`` (everything Pillow opens except
    :data:`EXTERNAL_PROGRAM_FORMATS`; write ``all,eps`` to add EPS).
    """
    names: list[str] = []
    for word in (w.strip().upper() for w in text.split(",")):
        if word == "ALL":
            names += [f for f in available_formats() if f not in EXTERNAL_PROGRAM_FORMATS]
        elif word == "WEB":
            names += WEB_FORMATS
        elif word:
            names.append(word)
    return _checked_formats(names)


def _checked_formats(names: object) -> tuple[str, ...]:
    """Upper-case, de-duplicated, sorted format ids; ValueError naming what Pillow has."""
    if isinstance(names, str):
        return parse_formats(names)
    if not isinstance(names, list | tuple | set | frozenset):
        raise ValueError(f"source_formats must be a list of format names; got {names!r}")
    upper = {str(name).strip().upper() for name in names}
    known = available_formats()
    unknown = sorted(upper - set(known))
    if unknown:
        raise ValueError(
            f"unknown source formats {', '.join(unknown)}; Pillow has: {', '.join(known)}"
        )
    if not upper:
        raise ValueError(f"source_formats is empty; Pillow has: {', '.join(known)}")
    if "JPEG" in upper:
        upper.add("MPO")
    return tuple(sorted(upper))


@dataclass(frozen=True)
class ThumbSettings:
    """How to make thumbnails. Invalid values raise ValueError at construction.

    ``source_formats`` are the Pillow format ids allowed to be decoded (a list, a
    tuple, or a string for :func:`parse_formats`); stored as a sorted tuple.
    """

    size: tuple[int, int] = (128, 128)
    mode: str = "fit"
    format: str = "jpeg"
    quality: int = 90
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = 100_000_000
    source_formats: tuple[str, ...] = WEB_FORMATS
    min_size: int = 0  # the original's shorter side below it: too_small (0: no limit)
    max_aspect_ratio: float = 0.0  # longer side / shorter side above it: bad_aspect_ratio
    # An original that already fits the box, in the output format, is kept byte for byte
    # (its metadata included: off by default, since re-encoding is what strips EXIF/GPS).
    keep_fitting: bool = False

    def __post_init__(self) -> None:
        # Settings often come from JSON/CLI as lists; store tuples so they stay hashable.
        object.__setattr__(self, "size", tuple(self.size))
        object.__setattr__(self, "background", tuple(self.background))
        object.__setattr__(self, "source_formats", _checked_formats(self.source_formats))
        _check_size(self.size)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {tuple(FORMATS)}; got {self.format!r}")
        if not (isinstance(self.quality, int) and 1 <= self.quality <= 100):
            raise ValueError(f"quality must be an integer in 1..100; got {self.quality!r}")
        bg = self.background
        if len(bg) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in bg):
            raise ValueError(f"background must be three integers in 0..255; got {bg!r}")
        if not (isinstance(self.max_pixels, int) and self.max_pixels >= 1):
            raise ValueError(f"max_pixels must be a positive integer; got {self.max_pixels!r}")
        if not (isinstance(self.min_size, int) and self.min_size >= 0):
            raise ValueError(f"min_size must be an integer >= 0; got {self.min_size!r}")
        if not (self.max_aspect_ratio == 0 or self.max_aspect_ratio >= 1):
            raise ValueError(
                f"max_aspect_ratio must be >= 1 (0: none); got {self.max_aspect_ratio}"
            )

    @property
    def ext(self) -> str:
        """File extension without the dot: ``jpg``, ``png`` or ``webp``."""
        return FORMATS[self.format][1]

    @property
    def content_type(self) -> str:
        return FORMATS[self.format][2]

    @property
    def pillow_format(self) -> str:
        return FORMATS[self.format][0]

    @property
    def keeps_alpha(self) -> bool:
        return self.format in ("png", "webp")


DEFAULT_THUMB = ThumbSettings()


@dataclass(frozen=True)
class Thumbnail:
    """Result for one image. ``data`` is the encoded thumbnail when ``ok``, else None."""

    status: Status
    error: str = ""
    data: bytes | None = field(default=None, repr=False)
    width: int = 0
    height: int = 0
    orig_width: int = 0
    orig_height: int = 0
    source_format: str = ""
    format: str = ""
    elapsed_s: float = 0.0
    phash: str = ""  # 64-bit difference hash of the thumbnail, 16 hex digits
    encoding: str = ""  # REENCODED, or ORIGINAL when the image's own bytes were kept

    @property
    def ok(self) -> bool:
        return self.status == Status.OK


REENCODED = "reencoded"
ORIGINAL = "original"


class ThumbnailError(Exception):
    """A per-image failure with its manifest status; raised by :func:`render_thumbnail`."""

    def __init__(
        self,
        status: Status,
        message: str,
        orig_size: tuple[int, int] = (0, 0),
        source_format: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.orig_size = orig_size
        self.source_format = source_format


@dataclass(frozen=True)
class Rendered:
    """A resized image before encoding (RGB, or RGBA for PNG/WebP with alpha)."""

    image: Image.Image
    orig_width: int
    orig_height: int
    source_format: str
    untouched: bool = False  # neither resized, rotated, padded nor re-moded: fits as it is


def make_thumbnail(data: bytes, settings: ThumbSettings = DEFAULT_THUMB) -> Thumbnail:
    """Decode ``data`` (by content, whatever its claimed type), resize and encode.

    Never raises for any bytes: every failure is a Thumbnail whose status says why.
    """
    start = time.perf_counter()
    try:
        rendered = render_thumbnail(data, settings)
        keep = settings.keep_fitting and rendered.untouched
        encoded = data if keep else _encode(rendered, settings)
    except ThumbnailError as exc:
        return _failure(exc, settings, start)
    except Exception as exc:  # MemoryError included; KeyboardInterrupt is not
        # The boundary: a bug or an exotic Pillow error must not kill a whole batch.
        logger.exception("unexpected error making a thumbnail")
        return _failure(ThumbnailError(Status.DECODE_ERROR, _describe(exc)), settings, start)
    return Thumbnail(
        status=Status.OK,
        data=encoded,
        width=rendered.image.width,
        height=rendered.image.height,
        orig_width=rendered.orig_width,
        orig_height=rendered.orig_height,
        source_format=rendered.source_format,
        format=settings.format,
        elapsed_s=time.perf_counter() - start,
        phash=difference_hash(rendered.image),
        encoding=ORIGINAL if keep else REENCODED,
    )


def difference_hash(im: Image.Image) -> str:
    """dHash: 64 bits, each whether a pixel of the 9x8 grey image is brighter than its right
    neighbour; 16 hex digits. Near-duplicates (re-encoded, resized, lightly edited) differ
    in a few bits; equal pictures under different URLs hash alike, so a group-by finds them."""
    grey = np.asarray(im.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def _failure(exc: ThumbnailError, settings: ThumbSettings, start: float) -> Thumbnail:
    logger.debug("thumbnail failed: %s: %s", exc.status, exc)
    return Thumbnail(
        status=exc.status,
        error=str(exc) or exc.status,
        orig_width=exc.orig_size[0],
        orig_height=exc.orig_size[1],
        source_format=exc.source_format,
        format=settings.format,
        elapsed_s=time.perf_counter() - start,
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def render_thumbnail(data: bytes, settings: ThumbSettings = DEFAULT_THUMB) -> Rendered:
    """Decode and resize without encoding; raises :class:`ThumbnailError` on bad input.

    Exposed so tests and benchmarks can judge the resized pixels before lossy encoding.
    """
    if not data:
        raise ThumbnailError("empty_body", "no image bytes")
    im = _open(data, settings)
    file_size, file_format = im.size, im.format or ""  # before draft() shrinks im.size
    try:
        return _render_open(im, data, settings)
    except ThumbnailError:
        raise
    except Exception as exc:
        raise _classify(exc, file_size, file_format) from exc
    finally:
        im.close()


def _open(data: bytes, settings: ThumbSettings) -> ImageFile.ImageFile:
    """Identify the image from its header only and refuse bombs before any decoding.

    Only the plugins of ``settings.source_formats`` see the bytes; when none of them
    recognises them, :func:`detected_format` names the format from its header.
    """
    allowed, plugins = settings.source_formats, _plugins(settings.source_formats)
    try:
        with _bomb_warnings_silenced():
            im = Image.open(io.BytesIO(data), formats=plugins)
    except Image.DecompressionBombError as exc:
        # Pillow refuses more than 2 x MAX_IMAGE_PIXELS inside open(), before we see the
        # size: read it from the header alone so the manifest still records it.
        header = _read_header(data, plugins)  # only allowed plugins parse anything
        raise _classify(exc, header.size, header.format) from exc
    except Image.UnidentifiedImageError as exc:
        raise _unidentified(data, allowed) from exc
    except Exception as exc:
        raise _classify(exc, (0, 0), "") from exc
    try:
        _check_opened(im, settings)
    except ThumbnailError:
        im.close()
        raise
    return im


def _check_opened(im: ImageFile.ImageFile, settings: ThumbSettings) -> None:
    """Refuse, from the header alone, what must not be decoded."""
    fmt = im.format or ""
    if fmt not in settings.source_formats:  # a plugin naming its result otherwise (MPO)
        raise _unsupported(fmt, settings.source_formats)
    width, height = im.size
    if width * height > settings.max_pixels:
        msg = f"{width}x{height} = {width * height} pixels exceeds max_pixels={settings.max_pixels}"
        raise ThumbnailError(Status.TOO_MANY_PIXELS, msg, (width, height), fmt)
    if width < 1 or height < 1:
        raise ThumbnailError(Status.DECODE_ERROR, f"empty image {width}x{height}", (0, 0), fmt)
    _filter(width, height, fmt, settings)


def _filter(width: int, height: int, fmt: str, settings: ThumbSettings) -> None:
    """The size filters, from the header: no pixel of a refused image is decoded."""
    short, long = sorted((width, height))
    if short < settings.min_size:
        message = f"{width}x{height}: shorter side below min_size={settings.min_size}"
        raise ThumbnailError(Status.TOO_SMALL, message, (width, height), fmt)
    if settings.max_aspect_ratio and long / short > settings.max_aspect_ratio:
        message = f"{width}x{height}: aspect ratio {long / short:.2f} > {settings.max_aspect_ratio}"
        raise ThumbnailError(Status.BAD_ASPECT_RATIO, message, (width, height), fmt)


@functools.lru_cache(maxsize=64)
def _plugins(allowed: tuple[str, ...]) -> tuple[str, ...]:
    """Pillow plugin ids that open ``allowed``, in Pillow's own order of trying them."""
    Image.init()
    wanted = set(allowed) | {_OPENED_BY[f] for f in allowed if f in _OPENED_BY}
    return tuple(name for name in Image.ID if name in wanted)


def _unidentified(data: bytes, allowed: tuple[str, ...]) -> ThumbnailError:
    """Why no allowed plugin opened ``data``: another format, a broken header, or junk."""
    fmt = detected_format(data)
    if not fmt:
        return ThumbnailError(Status.DECODE_ERROR, "not a recognised image format")
    if fmt in allowed or fmt in _plugins(allowed):
        return ThumbnailError(Status.DECODE_ERROR, f"unreadable {fmt} header", source_format=fmt)
    return _unsupported(fmt, allowed)


def _unsupported(fmt: str, allowed: tuple[str, ...]) -> ThumbnailError:
    return ThumbnailError(
        Status.UNSUPPORTED_FORMAT,
        f"format {fmt} is not in the allowed formats ({', '.join(allowed)})",
        source_format=fmt,
    )


def detected_format(data: bytes) -> str:
    """The Pillow format id of ``data`` from its header alone; ``""`` if none claims it.

    Pillow's own identification minus the pixels: see :func:`_read_header`. When no
    header parses, the first plugin whose magic number matched names the format.
    Magic numbers alone are not enough: an uncompressed TGA starts with the 4 bytes of
    the CUR magic, and TGA has no magic of its own.
    """
    Image.init()
    header = _read_header(data, Image.ID)
    return header.format or header.magic


@dataclass(frozen=True)
class _Header:
    size: tuple[int, int] = (0, 0)
    format: str = ""  # of the first header that parsed
    magic: str = ""  # the first plugin whose magic number matched


def _read_header(data: bytes, plugins: Iterable[str]) -> _Header:
    """The first of ``plugins`` (in Pillow's order) whose header parses, as ``Image.open``
    would find it but without its size check: each plugin's ``accept`` (a magic-number
    test on the first 16 bytes; plugins without one always pass), then its factory,
    which reads the header only. No pixel is decoded.
    """
    prefix, magic = data[:16], ""
    for name in plugins:
        factory, accept = Image.OPEN[name]
        if accept is not None:
            if not _accepts(accept, prefix):
                continue
            magic = magic or name
        try:
            with factory(io.BytesIO(data), None) as im:
                return _Header(im.size, im.format or name, magic)
        except Image.DecompressionBombError:
            # Some plugins (WebP, GIF, ICO) check the size themselves, inside the
            # header parse: the format is known, the size is not.
            return _Header(format=name, magic=magic)
        except Exception:  # not this format, or an unreadable header: try the next
            continue
    return _Header(magic=magic)


def _accepts(accept: Callable[[bytes], bool | str], prefix: bytes) -> bool:
    try:
        result = accept(prefix)
    except Exception:  # a plugin's magic test tripping over short input is a "no"
        return False
    return bool(result) and not isinstance(result, str)  # a str is a reason for refusal


@contextmanager
def _bomb_warnings_silenced() -> Iterator[None]:
    """Hide Pillow's DecompressionBombWarning: ``max_pixels`` is our own, stricter check.

    Scoped with catch_warnings instead of changing ``Image.MAX_IMAGE_PIXELS`` or the
    global filters, so other code still sees its warnings.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _classify(exc: BaseException, size: tuple[int, int], fmt: str) -> ThumbnailError:
    """Map an exception raised while decoding to a manifest status."""
    message = _describe(exc)
    # Running out of memory while decoding means the image is too big for this worker.
    if isinstance(exc, Image.DecompressionBombError | MemoryError):
        return ThumbnailError(Status.TOO_MANY_PIXELS, message, size, fmt)
    if isinstance(exc, Image.UnidentifiedImageError):
        # Pillow's message names a BytesIO address: useless in a manifest.
        return ThumbnailError(Status.DECODE_ERROR, "not a recognised image format", size, fmt)
    text = str(exc).lower()
    if isinstance(exc, EOFError) or any(hint in text for hint in _TRUNCATION_HINTS):
        return ThumbnailError(Status.TRUNCATED_IMAGE, message, size, fmt)
    return ThumbnailError(Status.DECODE_ERROR, message, size, fmt)


@dataclass(frozen=True)
class _Plan:
    """Geometry in the file's own (un-rotated) pixel frame."""

    out_size: tuple[int, int]  # resized size before orientation and padding
    region: tuple[float, float, float, float]  # source box to resample from
    transpose: Image.Transpose | None


def _plan(src_size: tuple[int, int], orientation: int, settings: ThumbSettings) -> _Plan:
    """Work out sizes in the displayed (oriented) frame, then map them to the file frame.

    Centred crops commute with every EXIF rotation/flip, so swapping axes is enough.
    """
    swap = orientation in _SWAPS_AXES
    width, height = (src_size[1], src_size[0]) if swap else src_size
    if settings.mode == "crop":
        out = settings.size
        region = _cover_region(width, height, out)
    else:
        out = fit_size(width, height, settings.size)
        region = (0.0, 0.0, float(width), float(height))
    if swap:
        out = (out[1], out[0])
        region = (region[1], region[0], region[3], region[2])
    return _Plan(out, region, _TRANSPOSE.get(orientation))


def fit_size(width: int, height: int, box: tuple[int, int]) -> tuple[int, int]:
    """Size that fits ``box`` keeping the aspect ratio, never upscaling.

    Same arithmetic as ``PIL.Image.thumbnail`` (so sizes match it exactly), without
    needing an image object.
    """
    bw, bh = box
    if bw >= width and bh >= height:
        return width, height
    aspect = width / height

    def closest(number: float, error: Callable[[int], float]) -> int:
        return max(min(math.floor(number), math.ceil(number), key=error), 1)

    if bw / bh >= aspect:
        return closest(bh * aspect, lambda n: abs(aspect - n / bh)), bh
    return bw, closest(bw / aspect, lambda n: 0 if n == 0 else abs(aspect - bw / n))


def _cover_region(
    width: int, height: int, box: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Centred source box with the box's aspect ratio, as large as the image allows."""
    box_aspect = box[0] / box[1]
    if width / height > box_aspect:
        crop_w, crop_h = height * box_aspect, float(height)
    else:
        crop_w, crop_h = float(width), width / box_aspect
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return left, top, left + crop_w, top + crop_h


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8; a corrupt EXIF block just means "upright"."""
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception as exc:  # malformed EXIF is common and harmless to ignore
        logger.debug("ignoring unreadable EXIF: %r", exc)
        return 1
    return value if value in range(1, 9) else 1


def _render_open(im: ImageFile.ImageFile, data: bytes, settings: ThumbSettings) -> Rendered:
    file_size = im.size
    plain = _plain(im, settings)  # before draft() or load() change the mode
    scale = _draft(im, settings)
    pixels = _decoded(im, data)
    # EXIF is read again after load: PNG may carry its eXIf chunk after the pixels.
    orientation = _orientation(im)
    src_size = file_size if scale else pixels.size
    plan = _plan(src_size, orientation, settings)
    sx, sy = scale or (1.0, 1.0)
    x0, y0, x1, y1 = plan.region
    work = _resizable(pixels)
    small = work.resize(
        plan.out_size, RESAMPLE, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy), reducing_gap=REDUCING_GAP
    )
    small = _output_mode(_to_8bit(small), settings)
    if plan.transpose is not None:
        small = small.transpose(plan.transpose)
    if settings.mode == "pad":
        small = _pad(small, settings)
    oriented = (src_size[1], src_size[0]) if orientation in _SWAPS_AXES else src_size
    untouched = plain and plan.transpose is None and small.size == file_size == plan.out_size
    return Rendered(small, oriented[0], oriented[1], im.format or "", untouched)


def _decoded(im: ImageFile.ImageFile, data: bytes) -> Image.Image:
    """The image's pixels: ``im`` loaded, or for a still WebP, libwebp's own decoding.

    Pillow decodes every WebP through libwebp's animation decoder, then copies the frame
    through its raw decoder. ``WebPDecode`` (imagecodecs, the same libwebp) gives the same
    pixels for less: with Pillow's open, 1 MP photos 28 -> 12 ms, and a 1600 px WebP's
    thumbnail takes 19-22 ms instead of 37-41; at 512 px the gain is lost in the noise
    (``benchmarks/README.md``). Whatever it refuses, Pillow decodes again, so a broken
    file gets the status Pillow's error gives it, as before.
    """
    if im.format == "WEBP" and getattr(im, "n_frames", 1) == 1:
        pixels = _webp_pixels(data, im)
        if pixels is not None:
            return pixels
    im.load()
    return im


def _webp_pixels(data: bytes, im: ImageFile.ImageFile) -> Image.Image | None:
    """A still WebP's pixels as RGBA, or RGBX without alpha (Pillow's own layout of RGB,
    so the array is mapped, not copied); None if libwebp refuses the file or its frame
    is not the size the header announced (the size ``max_pixels`` was checked against)."""
    try:
        pixels = imagecodecs.webp_decode(data, hasalpha=True)
    except Exception:  # truncated, corrupt: Pillow will say which
        return None
    if pixels.shape != (im.height, im.width, 4):
        return None
    mode = "RGBA" if im.mode == "RGBA" else "RGBX"
    return Image.frombuffer(mode, im.size, pixels, "raw", mode, 0, 1)


def _plain(im: ImageFile.ImageFile, settings: ThumbSettings) -> bool:
    """Whether the file could be the thumbnail itself: one frame of the output format in a
    mode every decoder shows alike (no CMYK JPEG, no 16-bit PNG)."""
    modes = ("RGB", "L", "RGBA", "LA", "P") if settings.keeps_alpha else ("RGB", "L")
    return (
        im.format == settings.pillow_format and im.mode in modes and getattr(im, "n_frames", 1) == 1
    )


def _draft(im: ImageFile.ImageFile, settings: ThumbSettings) -> tuple[float, float] | None:
    """Let the decoder shrink while decoding (JPEG DCT scaling); None if it did not.

    Returns loaded-pixels-per-file-pixel per axis. Only JPEG implements draft, and its
    EXIF is parsed at open, so the orientation (hence the target) is known this early.
    """
    if im.format not in ("JPEG", "MPO"):
        return None
    width, height = im.size
    plan = _plan(im.size, _orientation(im), settings)
    x0, y0, x1, y1 = plan.region
    # Aim at DRAFT_GAP decoded pixels per output pixel over the region we keep.
    target = (
        max(1, math.ceil(width * plan.out_size[0] * DRAFT_GAP / (x1 - x0))),
        max(1, math.ceil(height * plan.out_size[1] * DRAFT_GAP / (y1 - y0))),
    )
    result = im.draft(None, target)
    if result is None:
        return None
    box = result[1]
    return box[2] / width, box[3] / height


def _resizable(im: Image.Image) -> Image.Image:
    """Convert modes Pillow cannot resample well (palette, 1-bit, 16-bit, odd spaces)."""
    mode = im.mode
    if mode in ("RGB", "RGBX", "RGBA", "L", "LA", "CMYK", "I", "F"):
        return im  # resampled as-is; converting here would cost a full-size pass
    if (mode == "P" and "transparency" in im.info) or mode == "PA":
        return _with_alpha(im)
    if mode == "1":
        return im.convert("L")  # so LANCZOS yields grey levels, not nearest-neighbour
    if mode.startswith("I;16"):
        return _to_8bit(im)
    if mode in ("La", "RGBa"):
        return im.convert(mode.upper())
    return im.convert("RGB")


def _with_alpha(im: Image.Image) -> Image.Image:
    """RGBA from a palette image with transparency.

    A PNG tRNS chunk may list more alphas than a palette can hold (256); Pillow loads
    it but refuses to convert ("palette index out of range"). Browsers ignore the
    excess, and so do we.
    """
    alphas = im.info.get("transparency")
    if isinstance(alphas, bytes) and len(alphas) > 256:
        im.info["transparency"] = alphas[:256]
    return im.convert("RGBA")


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit grey to 8-bit L: values above 255 are taken as a 16-bit range."""
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    pixels = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or pixels.max(initial=0) > 255:
        pixels = pixels / 257.0
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


def _output_mode(im: Image.Image, settings: ThumbSettings) -> Image.Image:
    """RGB, or RGBA when the output format keeps alpha; JPEG gets alpha composited."""
    if im.mode not in ("RGBA", "LA"):
        return im if im.mode == "RGB" else im.convert("RGB")
    rgba = im if im.mode == "RGBA" else im.convert("RGBA")
    if settings.keeps_alpha:
        return rgba
    canvas = Image.new("RGB", rgba.size, settings.background)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def _pad(im: Image.Image, settings: ThumbSettings) -> Image.Image:
    """Centre ``im`` on exactly ``settings.size``; transparent fill if it has alpha."""
    if im.size == settings.size:
        return im
    fill = (*settings.background, 0) if im.mode == "RGBA" else settings.background
    canvas = Image.new(im.mode, settings.size, fill)
    offset = ((settings.size[0] - im.width) // 2, (settings.size[1] - im.height) // 2)
    canvas.paste(im, offset)
    return canvas


def _encode(rendered: Rendered, settings: ThumbSettings) -> bytes:
    buf = io.BytesIO()
    im = rendered.image
    try:
        if settings.format == "jpeg":
            # optimize=False: Huffman optimisation costs time and saves little at 128 px.
            im.save(buf, "JPEG", quality=settings.quality, optimize=False)
        elif settings.format == "webp":
            im.save(buf, "WEBP", quality=settings.quality, method=4)
        else:
            im.save(buf, "PNG", compress_level=6)
    except Exception as exc:  # MemoryError too: the input was fine, the output was not
        orig = (rendered.orig_width, rendered.orig_height)
        raise ThumbnailError(
            Status.ENCODE_ERROR, _describe(exc), orig, rendered.source_format
        ) from exc
    return buf.getvalue()
