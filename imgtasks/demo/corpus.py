"""Deterministic, photo-like image corpus for the demo server, tests and benchmarks.

Images are synthesised from seeded value noise: smooth multi-octave colour fields made
at low resolution and upsampled by Pillow (cheap), flat shapes for hard edges and a
tiled grain texture so JPEG sizes look like real photos (a 12 MP JPEG at q=90 is a few
MB).  Generation is seeded per item, so a given ``CORPUS_VERSION`` always yields the
same bytes with the same Pillow/libjpeg build.  Results are cached on disk under
``platformdirs.user_cache_dir("imgtasks")`` (or ``$IMGTASKS_CACHE_DIR``) in a versioned
directory written atomically, and in-process with ``functools.lru_cache``.

`photo_like` is the one image synthesiser: the thumbnail tests and benchmark judge
quality on its images too (through :mod:`imgtasks.imagecheck`).  The hostile-file
makers (`make_bomb_png`, `truncate`, `corrupt_jpeg`) are at the end.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import platformdirs
from PIL import Image, ImageChops, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

# Bump whenever generation changes, so stale caches are never reused.
CORPUS_VERSION = 1
CACHE_ENV_VAR = "IMGTASKS_CACHE_DIR"
DEFAULT_SEED = 20240601
KINDS = ("photos", "tiny", "web")
WEB_COUNT = 300  # distinct web-size images
WEB_SIDE = 512  # their longest side
_MANIFEST = "manifest.json"
_EXIF_ORIENTATION = 0x0112
_GRAIN_TILE = 256

CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
}


@dataclass(frozen=True)
class CorpusItem:
    """One encoded image.  ``width``/``height`` are the stored (pre-EXIF-rotation) size."""

    name: str
    content_type: str
    ext: str
    width: int
    height: int
    data: bytes
    orientation: int = 1  # EXIF orientation tag; 6 means "rotate 90° clockwise to view"
    progressive: bool = False
    frames: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class _Spec:
    """What to generate for one item (everything but the pixels)."""

    name: str
    fmt: str  # jpg | png | webp | gif
    width: int
    height: int
    quality: int = 90
    orientation: int = 1
    progressive: bool = False
    frames: int = 1
    grain: float = 8.0
    colours: int = 0  # PNG: a palette of this many colours (0: RGB)


# --------------------------------------------------------------------------- specs


def _photo_specs(rng: np.random.Generator) -> list[_Spec]:
    """~48 items: 7 × 12 MP, 12 × ~1080p, 17 small JPEG, 6 RGBA PNG, 4 WebP, 2 GIF."""
    specs: list[_Spec] = []
    for i in range(7):
        # Phone photos: some shot in portrait, one stored landscape + EXIF orientation 6.
        w, h = (3000, 4000) if i in (2, 5) else (4000, 3000)
        specs.append(_Spec(f"phone{i}", "jpg", w, h, 90, orientation=6 if i == 4 else 1))
    hd_sizes = [(1920, 1080), (1920, 1280), (1600, 1200), (1080, 1920), (2048, 1152)]
    for i in range(12):
        w, h = hd_sizes[i % len(hd_sizes)]
        specs.append(
            _Spec(f"hd{i}", "jpg", w, h, int(rng.integers(80, 93)), progressive=i % 4 == 1)
        )
    for i in range(17):
        w = int(rng.integers(640, 1281)) // 8 * 8
        h = w * 3 // 4
        if i % 5 == 2:  # portrait
            w, h = h, w
        specs.append(
            _Spec(
                f"small{i}",
                "jpg",
                w,
                h,
                int(rng.integers(70, 96)),
                orientation=6 if i % 4 == 3 else 1,
                progressive=i % 3 == 0,
            )
        )
    for i in range(6):
        w = int(rng.integers(800, 1601))
        specs.append(_Spec(f"alpha{i}", "png", w, int(w * rng.uniform(0.6, 1.0))))
    for i in range(4):
        w = int(rng.integers(800, 1921))
        specs.append(_Spec(f"webp{i}", "webp", w, w * 9 // 16, int(rng.integers(75, 91))))
    for i in range(2):
        w = int(rng.integers(320, 641))
        specs.append(_Spec(f"anim{i}", "gif", w, w * 3 // 4, frames=2 + i * 2))
    return specs


def _tiny_specs(rng: np.random.Generator) -> list[_Spec]:
    """16 thumbnail-sized JPEGs of a few KB, for scale benchmarks."""
    specs = []
    for i in range(16):
        w = int(rng.integers(64, 201))
        specs.append(_Spec(f"tiny{i}", "jpg", w, w * 3 // 4, int(rng.integers(70, 91))))
    return specs


# Web-size shapes (width:height), landscape first; each also appears as portrait.
_WEB_ASPECTS = ((4, 3), (3, 2), (16, 9), (1, 1), (5, 4))


def _web_specs(rng: np.random.Generator) -> list[_Spec]:
    """WEB_COUNT images with a longest side of 512 px, ~20-60 KB each, what most of a real
    crawl (LAION's, say) is: 80 % JPEG (q 75-92, one in 8 progressive), 10 % WebP,
    10 % palette PNG (web graphics; an RGB PNG of a photo would be ~300 KB)."""
    specs = []
    for i in range(WEB_COUNT):
        aw, ah = _WEB_ASPECTS[int(rng.integers(0, len(_WEB_ASPECTS)))]
        w, h = WEB_SIDE, max(16, WEB_SIDE * ah // aw)
        if rng.random() < 0.3:
            w, h = h, w
        grain = float(rng.uniform(5.0, 10.0))
        kind = i % 10
        if kind == 3:
            specs.append(_Spec(f"web{i}", "webp", w, h, int(rng.integers(78, 91)), grain=grain))
        elif kind == 7:
            colours = int(rng.choice((64, 128, 256)))
            specs.append(_Spec(f"web{i}", "png", w, h, grain=grain / 2, colours=colours))
        else:
            quality = int(rng.integers(75, 93))
            specs.append(
                _Spec(f"web{i}", "jpg", w, h, quality, progressive=i % 8 == 1, grain=grain)
            )
    return specs


_SPEC_BUILDERS: dict[str, Callable[[np.random.Generator], list[_Spec]]] = {
    "photos": _photo_specs,
    "tiny": _tiny_specs,
    "web": _web_specs,
}


# --------------------------------------------------------------------------- pixels


def _value_noise(rng: np.random.Generator, w: int, h: int, octaves: int, bands: int) -> np.ndarray:
    """Smooth fractal noise in 0..255, shape (h, w, bands): random grids upsampled by Pillow."""
    acc = np.zeros((h, w, bands), np.float32)
    amp, total = 1.0, 0.0
    for octave in range(octaves):
        gw = 3 * 2**octave + 1
        gh = max(2, round(gw * h / w))
        grid = rng.integers(0, 256, (gh, gw, bands), dtype=np.uint8)
        layer = Image.fromarray(grid if bands == 3 else grid[..., 0], "RGB" if bands == 3 else "L")
        arr = np.asarray(layer.resize((w, h), Image.Resampling.BICUBIC), np.float32)
        acc += amp * arr.reshape(h, w, bands)
        total += amp
        amp *= 0.55
    return acc / total


def _grain(rng: np.random.Generator, w: int, h: int, amplitude: float) -> Image.Image:
    """Full-size sensor-like grain centred on 128, made by tiling one small random tile.

    Tiling keeps this cheap for 12 MP; JPEG codes each 8x8 block independently, so the
    repetition does not make the output smaller.
    """
    shared = rng.normal(0.0, 1.0, (_GRAIN_TILE, _GRAIN_TILE, 1))
    own = rng.normal(0.0, 1.0, (_GRAIN_TILE, _GRAIN_TILE, 3))
    tile_arr = np.clip((shared * 0.85 + own * 0.5) * amplitude + 128, 0, 255).astype(np.uint8)
    tile = Image.fromarray(tile_arr, "RGB")
    big = Image.new("RGB", (w, h))
    for y in range(0, h, _GRAIN_TILE):
        for x in range(0, w, _GRAIN_TILE):
            big.paste(tile, (x, y))
    return big


def _draw_shapes(rng: np.random.Generator, img: Image.Image) -> None:
    """A few flat ellipses, rectangles and polygons: the hard edges real photos have."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        sw, sh = int(rng.integers(w // 20, w // 3 + 1)), int(rng.integers(h // 20, h // 3 + 1))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse([x0, y0, x0 + sw, y0 + sh], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + sw, y0 + sh], fill=colour)
        else:
            xs = rng.integers(x0 - sw, x0 + sw + 1, 5)
            ys = rng.integers(y0 - sh, y0 + sh + 1, 5)
            draw.polygon([(int(x), int(y)) for x, y in zip(xs, ys, strict=True)], fill=colour)


def photo_like(
    width: int, height: int, seed: int | np.random.Generator = 0, grain: float = 8.0
) -> Image.Image:
    """A deterministic photo-like RGB image: sky-to-ground gradient, colour clouds, a few
    hard-edged shapes and sensor grain (``grain`` is its amplitude) where a smooth mask
    says so.

    Not per-pixel noise, which no real photo looks like and which makes every resampler
    look bad. ``seed`` is an int, or a ``numpy`` Generator to draw from (the corpus passes
    each item's own, whose stream then goes on to the item's alpha or frames). A 12 MP
    image takes about 0.3 s.
    """
    rng = np.random.default_rng(seed)  # a Generator is used as it is
    w, h = width, height
    lw, lh = max(32, w // 8), max(24, h // 8)
    clouds = _value_noise(rng, lw, lh, octaves=5, bands=3)
    top, bottom = rng.integers(60, 230, 3), rng.integers(10, 160, 3)
    t = np.linspace(0.0, 1.0, lh, dtype=np.float32)[:, None, None]
    low = 0.55 * (top * (1 - t) + bottom * t) + 0.72 * (clouds - 128) + 0.45 * 128
    img = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8), "RGB")
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    _draw_shapes(rng, img)
    # Grain only where a smooth mask says so: real photos mix flat sky and busy detail.
    mask_low = _value_noise(rng, lw, lh, octaves=3, bands=1)[..., 0]
    mask = Image.fromarray(np.clip((mask_low - 80) * 3, 0, 255).astype(np.uint8), "L")
    mask = mask.resize((w, h), Image.Resampling.BILINEAR)
    textured = ImageChops.add(img, _grain(rng, w, h, grain), scale=1.0, offset=-128)
    return Image.composite(textured, img, mask)


def _alpha_mask(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Soft-edged blobs on a transparent background (real, varied alpha)."""
    lw, lh = max(32, w // 8), max(24, h // 8)
    blobs = _value_noise(rng, lw, lh, octaves=3, bands=1)[..., 0]
    alpha = Image.fromarray(np.clip((blobs - 110) * 6, 0, 255).astype(np.uint8), "L")
    alpha = alpha.resize((w, h), Image.Resampling.BICUBIC)
    return alpha.filter(ImageFilter.GaussianBlur(2))


# --------------------------------------------------------------------------- encoding


def _encode(spec: _Spec, seed: np.random.SeedSequence) -> CorpusItem:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    if spec.fmt == "jpg":
        _encode_jpeg(rng, spec, buf)
    elif spec.fmt == "png" and spec.colours:
        img = photo_like(spec.width, spec.height, rng, grain=spec.grain)
        palette = img.quantize(colors=spec.colours, dither=Image.Dither.NONE)
        buf.write(_save(palette, "PNG", optimize=False, compress_level=6))
    elif spec.fmt == "png":
        img = photo_like(spec.width, spec.height, rng, grain=5.0)
        img.putalpha(_alpha_mask(rng, spec.width, spec.height))
        buf.write(_save(img, "PNG", optimize=False, compress_level=6))
    elif spec.fmt == "webp":
        img = photo_like(spec.width, spec.height, rng, grain=spec.grain)
        buf.write(_save(img, "WEBP", quality=spec.quality, method=4))
    elif spec.fmt == "gif":
        _encode_gif(rng, spec, buf)
    else:  # pragma: no cover - specs are internal
        raise ValueError(f"unknown format {spec.fmt!r}")
    return CorpusItem(
        name=spec.name,
        content_type=CONTENT_TYPES[spec.fmt],
        ext=spec.fmt,
        width=spec.width,
        height=spec.height,
        data=buf.getvalue(),
        orientation=spec.orientation,
        progressive=spec.progressive,
        frames=spec.frames,
    )


def _save(img: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def _encode_jpeg(rng: np.random.Generator, spec: _Spec, buf: io.BytesIO) -> None:
    w, h = spec.width, spec.height
    img = photo_like(w, h, rng, grain=spec.grain)
    params: dict[str, object] = {"quality": spec.quality, "progressive": spec.progressive}
    if spec.orientation != 1:
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION] = spec.orientation
        params["exif"] = exif.tobytes()
    buf.write(_save(img, "JPEG", **params))


def _encode_gif(rng: np.random.Generator, spec: _Spec, buf: io.BytesIO) -> None:
    base = photo_like(spec.width, spec.height, rng, grain=4.0)
    frames = []
    for i in range(spec.frames):
        # Each frame shifts the scene and adds a moving shape, so frames really differ.
        frame = ImageChops.offset(base, i * spec.width // 10, 0)
        _draw_shapes(rng, frame)
        frames.append(frame.quantize(colors=128, dither=Image.Dither.NONE))
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=120, loop=0)


def _jobs(kind: str, seed: int) -> list[tuple[_Spec, np.random.SeedSequence]]:
    """The item specs in corpus order, each with its own seed (so items are independent)."""
    _check_kind(kind)
    root = np.random.SeedSequence([seed, KINDS.index(kind)])
    spec_seed, order_seed = root.spawn(2)
    specs = _SPEC_BUILDERS[kind](np.random.default_rng(spec_seed))
    # Shuffle so any prefix of the URL list already mixes sizes and formats.
    order = np.random.default_rng(order_seed).permutation(len(specs))
    specs = [specs[int(i)] for i in order]
    return list(zip(specs, root.spawn(len(specs)), strict=True))


def generate_corpus(kind: str = "photos", seed: int = DEFAULT_SEED) -> tuple[CorpusItem, ...]:
    """Generate a corpus in memory (no caching)."""
    jobs = _jobs(kind, seed)
    workers = max(1, min(4, os.cpu_count() or 1))
    # Pillow releases the GIL while resizing/encoding; seeds are per item, so threads
    # cannot change the output.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return tuple(pool.map(lambda job: _encode(*job), jobs))


# --------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """Root cache directory: ``$IMGTASKS_CACHE_DIR`` or the platform user cache dir."""
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override) if override else Path(platformdirs.user_cache_dir("imgtasks"))


def corpus_dir(kind: str = "photos", seed: int = DEFAULT_SEED) -> Path:
    return cache_root() / f"corpus-v{CORPUS_VERSION}" / f"{kind}-{seed}"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown corpus kind {kind!r}; expected one of {KINDS}")


def _file_name(index: int, item: CorpusItem) -> str:
    return f"{index:03d}-{item.name}.{item.ext}"


def _write_cache(items: tuple[CorpusItem, ...], final: Path) -> None:
    """Write into a temp dir next to ``final`` and rename it into place.

    The rename is atomic, so a concurrent reader sees either nothing or a complete
    corpus; if another process won the race, its copy is kept and ours discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        meta = []
        for index, item in enumerate(items):
            (tmp / _file_name(index, item)).write_bytes(item.data)
            fields = asdict(item)
            del fields["data"]
            meta.append(fields)
        (tmp / _MANIFEST).write_text(json.dumps({"version": CORPUS_VERSION, "items": meta}))
        try:
            tmp.rename(final)
        except OSError:
            if not (final / _MANIFEST).exists():
                raise
            logger.debug("corpus cache %s written concurrently; keeping the other copy", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(path: Path) -> tuple[CorpusItem, ...] | None:
    """Load a cached corpus, or None if it is missing or unreadable."""
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
        if manifest.get("version") != CORPUS_VERSION:
            return None
        items = []
        for index, fields in enumerate(manifest["items"]):
            data = (path / f"{index:03d}-{fields['name']}.{fields['ext']}").read_bytes()
            items.append(CorpusItem(data=data, **fields))
        return tuple(items)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if path.exists():
            logger.warning("ignoring unreadable corpus cache %s: %s", path, exc)
        return None


@functools.cache
def load_corpus(kind: str = "photos", seed: int = DEFAULT_SEED) -> tuple[CorpusItem, ...]:
    """Return the corpus ``kind`` ("photos", "tiny" or "web"), generating and caching it once."""
    _check_kind(kind)
    path = corpus_dir(kind, seed)
    cached = _read_cache(path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    items = generate_corpus(kind, seed)
    logger.info(
        "generated %s corpus (%d items, %.1f MB) in %.1f s",
        kind,
        len(items),
        sum(len(i.data) for i in items) / 1e6,
        time.perf_counter() - start,
    )
    try:
        _write_cache(items, path)
    except OSError as exc:  # a read-only cache dir must not break the demo
        logger.warning("could not cache corpus in %s: %s", path, exc)
    return items


# --------------------------------------------------------------------------- faults


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


@functools.lru_cache(maxsize=8)
def make_bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit greyscale PNG declaring ``width × height`` pixels, all black.

    Rows are streamed through zlib one at a time, so memory stays at one row
    (2.5 KB for 20000 px) while the file declares e.g. 400 MP in ~50 KB.
    """
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte "None" + packed zero bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", ihdr),
            _png_chunk(b"IDAT", b"".join(parts)),
            _png_chunk(b"IEND", b""),
        ]
    )


def truncate(data: bytes, fraction: float) -> bytes:
    """The first ``fraction`` (0..1) of ``data``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within [0, 1], got {fraction}")
    return data[: int(len(data) * fraction)]


def _jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(marker, offset) of each header segment up to and including SOS."""
    found, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        found.append((marker, pos))
        if marker == 0xDA:  # SOS: entropy-coded data follows
            break
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    return found


def corrupt_jpeg(data: bytes) -> bytes:
    """Deterministically corrupt a JPEG so that ``Image.open(...).load()`` raises.

    Headers stay parseable (so the file still sniffs as a JPEG with a size), but every
    Huffman table is made invalid (code counts summing past 256, which libjpeg rejects
    as fatal) and bytes of the entropy-coded data are scrambled as well.
    """
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (missing SOI marker)")
    out = bytearray(data)
    segments = _jpeg_segments(data)
    for marker, pos in segments:
        if marker == 0xC4:  # DHT: the 16 code-length counts follow the table id byte
            out[pos + 5 : pos + 21] = b"\xff" * 16
    sos = [pos for marker, pos in segments if marker == 0xDA]
    if not sos:
        raise ValueError("not a JPEG (no SOS segment)")
    start = sos[0] + 2 + struct.unpack(">H", data[sos[0] + 2 : sos[0] + 4])[0]
    for pos in range(start + 16, len(out) - 2, 97):
        # XOR with 0x55 never turns a byte into 0xFF unless it was 0xAA; skip those and
        # marker bytes so the damage stays inside the scan.
        if out[pos] not in (0xFF, 0xAA) and out[pos - 1] != 0xFF:
            out[pos] ^= 0x55
    return bytes(out)
