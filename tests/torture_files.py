"""Hostile image files for ``test_torture``: every format Pillow writes, valid and broken.

:func:`torture_files` writes a small image in every format of ``PIL.Image.SAVE`` (and a
palette variant of the formats that have palettes), then derives from it:

- ``cut-N``: the first N bytes (several cut points, header to last byte);
- ``w=V`` / ``h=V`` / ``wh=V``: the header's width and/or height fields set to V
  (0, 1, 65535, 2**31-1, 2**32-1 where the field is that wide), checksums kept valid
  where the format has one, so the parser believes them;
- palette lies: tables cut short, oversized, or counts that disagree with the table;
- length lies: chunk, segment, box and offset fields that point past the end, say zero,
  or disagree with the data.

Everything is deterministic and small (a 32x24 source image): a few hundred files,
a few MB in all.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

SOURCE_SIZE = (32, 24)
BITS16 = (0, 1, 65535)
BITS32 = (0, 1, 65535, 2**31 - 1, 2**32 - 1)
# Modes tried in turn until the format's writer takes one.
WRITE_MODES = ("RGB", "RGBA", "P", "L", "1")
# Formats that also get a palette ("P") original, for the palette lies.
PALETTE_FORMATS = ("BMP", "GIF", "PCX", "PNG", "TGA", "TIFF")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class TortureFile:
    name: str  # a plain file name: lower-case format, then the variant
    data: bytes
    written_as: str  # the Pillow format of the valid original it was derived from
    variant: str


@dataclass(frozen=True)
class Unwritable:
    """A format in ``Image.SAVE`` whose writer refused every mode, and why."""

    format: str
    reason: str


def torture_files() -> tuple[list[TortureFile], list[Unwritable]]:
    """Every torture file, and the formats Pillow lists as writable but could not write."""
    Image.init()
    files: list[TortureFile] = []
    unwritable: list[Unwritable] = []
    for fmt in sorted(Image.SAVE):
        try:
            originals = list(_originals(fmt))
        except Exception as exc:  # stub plugins: "BUFR save handler not installed"
            unwritable.append(Unwritable(fmt, f"{type(exc).__name__}: {exc}"))
            continue
        for label, data in originals:
            files += _derived(fmt, label, data)
    names = [f.name for f in files]
    assert len(names) == len(set(names)), "torture file names must be unique"
    return files, unwritable


def source_image() -> Image.Image:
    """A smooth RGB gradient: compresses like a photo, not like a flat colour."""
    w, h = SOURCE_SIZE
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _originals(fmt: str) -> Iterator[tuple[str, bytes]]:
    """(label, bytes) of the valid originals of ``fmt``: one, plus a palette one."""
    image = source_image()
    yield fmt.lower(), _first_writable(image, fmt)
    if fmt in PALETTE_FORMATS:
        palette = image.quantize(16)
        yield f"{fmt.lower()}-p", _save(palette, fmt)


def _first_writable(image: Image.Image, fmt: str) -> bytes:
    if fmt == "MPO":  # a real MPO needs a second frame, else Pillow writes a plain JPEG
        return _save(image, fmt, save_all=True, append_images=[image.transpose(0)])
    errors = []
    for mode in WRITE_MODES:
        converted = image.quantize(16) if mode == "P" else image.convert(mode)
        try:
            return _save(converted, fmt)
        except (OSError, ValueError, KeyError) as exc:
            errors.append(f"{mode}: {exc}")
    raise OSError("; ".join(errors))


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _derived(fmt: str, label: str, data: bytes) -> list[TortureFile]:
    """The valid file, its cuts, and its lies: palette lies for the palette original,
    dimension and length lies for the other."""
    variants = [("valid", data)]
    variants += [(f"cut-{n}", data[:n]) for n in _cut_points(len(data))]
    if label.endswith("-p"):
        liars = [_PALETTE_LIES.get(fmt)]
    else:
        liars = [_DIMENSIONS.get(fmt), _LENGTH_LIES.get(fmt)]
    for liar in filter(None, liars):
        variants += list(liar(data))
    # "=" reads well in a variant but is not a safe file name character.
    return [
        TortureFile(f"{label}-{name}".replace("=", "_"), body, fmt, name) for name, body in variants
    ]


def _cut_points(size: int) -> list[int]:
    """Inside the header, mid-file, and near the end."""
    return sorted({n for n in (12, 40, size // 2, size - size // 8, size - 1) if 0 < n < size})


# --------------------------------------------------------------------------- byte surgery


def _put(data: bytes, offset: int, layout: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(layout, out, offset, value)
    return bytes(out)


def _values_for(bits: int) -> tuple[int, ...]:
    return BITS16 if bits == 16 else BITS32


def _dimension_variants(
    set_size: Callable[[bytes, int | None, int | None], bytes], bits: int
) -> Callable[[bytes], Iterator[tuple[str, bytes]]]:
    """Variants with width, height or both replaced by each value the field can hold."""

    def variants(data: bytes) -> Iterator[tuple[str, bytes]]:
        for value in _values_for(bits):
            yield f"wh={value}", set_size(data, value, value)
        top = _values_for(bits)[-1]
        yield "w=0", set_size(data, 0, None)
        yield "h=0", set_size(data, None, 0)
        yield f"w={top}-h=1", set_size(data, top, 1)
        yield f"w=1-h={top}", set_size(data, 1, top)

    return variants


def _fields(layout: str, w_at: int, h_at: int) -> Callable[[bytes, int | None, int | None], bytes]:
    """Width and height as two fixed-offset integer fields."""

    def set_size(data: bytes, width: int | None, height: int | None) -> bytes:
        if width is not None:
            data = _put(data, w_at, layout, width)
        if height is not None:
            data = _put(data, h_at, layout, height)
        return data

    return set_size


# PNG: a list of (tag, payload) chunks, re-serialised with valid CRCs unless told not to.


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_bytes(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return _PNG_SIGNATURE + b"".join(_png_chunk(tag, payload) for tag, payload in chunks)


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


def _png_replace(data: bytes, tag: bytes, edit: Callable[[bytes], bytes]) -> bytes:
    return png_bytes([(t, edit(p) if t == tag else p) for t, p in png_chunks(data)])


def _ihdr_size(data: bytes, width: int | None, height: int | None) -> bytes:
    """Every IHDR in ``data`` (a PNG, or PNGs inside ICO/ICNS) resized, CRC fixed."""
    out = bytearray(data)
    for match in re.finditer(b"IHDR", data):
        at = match.start()
        if width is not None:
            struct.pack_into(">I", out, at + 4, width)
        if height is not None:
            struct.pack_into(">I", out, at + 8, height)
        struct.pack_into(">I", out, at + 17, zlib.crc32(bytes(out[at : at + 17])) & 0xFFFFFFFF)
    return bytes(out)


def _png_raw_length(data: bytes, tag: bytes, length: int) -> bytes:
    """The length field of the first ``tag`` chunk set to ``length``, all else unchanged."""
    at = data.index(tag) - 4
    return _put(data, at, ">I", length)


# GIF: header, optional global colour table, extension blocks, then the image descriptor.


def _gif_descriptor(data: bytes) -> int:
    flags = data[10]
    pos = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    while data[pos] == 0x21:  # extension: label, then sub-blocks until a zero length
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    assert data[pos] == 0x2C, "image descriptor expected"
    return pos


def _gif_size(data: bytes, width: int | None, height: int | None) -> bytes:
    at = _gif_descriptor(data)
    for offset in (6, at + 5):  # the logical screen and the first frame
        data = _fields("<H", offset, offset + 2)(data, width, height)
    return data


# JPEG: segments from the SOI; the SOFn segment holds height then width.

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_segment(data: bytes, markers: frozenset[int]) -> int:
    """Offset of the first 0xFF marker among ``markers``."""
    pos = 2
    while pos + 4 <= len(data):
        marker = data[pos + 1]
        if marker in markers:
            return pos
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length
    raise ValueError("marker not found")


def _jpeg_size(data: bytes, width: int | None, height: int | None) -> bytes:
    at = _jpeg_segment(data, _SOF_MARKERS)
    return _fields(">H", at + 7, at + 5)(data, width, height)


# TIFF: the first IFD's entries (tag, type, count, value), little- or big-endian.

_TIFF_LONG = 4


def _tiff_entries(data: bytes) -> tuple[str, dict[int, int]]:
    """Byte order prefix and {tag: offset of its 12-byte entry} of the first IFD."""
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    (count,) = struct.unpack_from(order + "H", data, ifd)
    entries = {}
    for i in range(count):
        at = ifd + 2 + 12 * i
        entries[struct.unpack_from(order + "H", data, at)[0]] = at
    return order, entries


def _tiff_set(data: bytes, tag: int, value: int) -> bytes:
    """Tag ``tag`` rewritten as one LONG holding ``value``."""
    order, entries = _tiff_entries(data)
    out = bytearray(data)
    struct.pack_into(order + "HII", out, entries[tag] + 2, _TIFF_LONG, 1, value)
    return bytes(out)


def _tiff_size(data: bytes, width: int | None, height: int | None) -> bytes:
    if width is not None:
        data = _tiff_set(data, 256, width)
    if height is not None:
        data = _tiff_set(data, 257, height)
    return data


def _tiff_count(data: bytes, tag: int, count: int) -> bytes:
    order, entries = _tiff_entries(data)
    return _put(data, entries[tag] + 4, order + "I", count)


# WebP (lossy, simple format): RIFF header, "VP8 " chunk, 14-bit sizes in the frame header.


def _webp_size(data: bytes, width: int | None, height: int | None) -> bytes:
    assert data[12:16] == b"VP8 ", "simple lossy WebP expected"
    return _fields("<H", 26, 28)(data, width, height)


def _ppm_size(data: bytes, width: int | None, height: int | None) -> bytes:
    match = re.match(rb"(P\d\s+)(\d+)(\s+)(\d+)", data)
    assert match, "PPM header expected"
    w = match.group(2) if width is None else str(width).encode()
    h = match.group(4) if height is None else str(height).encode()
    return match.group(1) + w + match.group(3) + h + data[match.end() :]


def _box_size(box: bytes, w_at: int, h_at: int) -> Callable[[bytes, int | None, int | None], bytes]:
    """Big-endian 32-bit width/height at fixed offsets after an ISO-BMFF box type."""

    def set_size(data: bytes, width: int | None, height: int | None) -> bytes:
        at = data.index(box)
        return _fields(">I", at + w_at, at + h_at)(data, width, height)

    return set_size


def _jpeg2000_size(data: bytes, width: int | None, height: int | None) -> bytes:
    data = _box_size(b"ihdr", 8, 4)(data, width, height)  # jp2 header box: height, width
    siz = data.index(b"\xff\x51")  # codestream SIZ: Xsiz, Ysiz after Lsiz and Rsiz
    return _fields(">I", siz + 6, siz + 10)(data, width, height)


_DIMENSIONS: dict[str, Callable[[bytes], Iterator[tuple[str, bytes]]]] = {
    "AVIF": _dimension_variants(_box_size(b"ispe", 8, 12), 32),
    "BLP": _dimension_variants(_fields("<I", 12, 16), 32),
    "BMP": _dimension_variants(_fields("<I", 18, 22), 32),
    "DDS": _dimension_variants(_fields("<I", 16, 12), 32),
    "GIF": _dimension_variants(_gif_size, 16),
    "ICO": _dimension_variants(_ihdr_size, 32),
    "JPEG": _dimension_variants(_jpeg_size, 16),
    "JPEG2000": _dimension_variants(_jpeg2000_size, 32),
    "PCX": _dimension_variants(_fields("<H", 8, 10), 16),  # xmax, ymax (inclusive)
    "PNG": _dimension_variants(_ihdr_size, 32),
    "PPM": _dimension_variants(_ppm_size, 32),
    "QOI": _dimension_variants(_fields(">I", 4, 8), 32),
    "SGI": _dimension_variants(_fields(">H", 6, 8), 16),
    "TGA": _dimension_variants(_fields("<H", 12, 14), 16),
    "TIFF": _dimension_variants(_tiff_size, 32),
    "WEBP": _dimension_variants(_webp_size, 16),
}


# --------------------------------------------------------------------------- palette lies


def _png_palette_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    yield "plte-2", _png_replace(data, b"PLTE", lambda p: p[:6])
    yield "plte-300", _png_replace(data, b"PLTE", lambda p: (p * 300)[: 300 * 3])
    yield "plte-7-bytes", _png_replace(data, b"PLTE", lambda p: p[:7])
    yield "plte-empty", _png_replace(data, b"PLTE", lambda p: b"")
    chunks = png_chunks(data)
    at = next(i for i, (tag, _) in enumerate(chunks) if tag == b"PLTE") + 1
    yield "trns-300", png_bytes([*chunks[:at], (b"tRNS", b"\x80" * 300), *chunks[at:]])


def _gif_palette_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    flags = data[10]
    yield "gct-claims-256", _put(data, 10, "B", flags | 0x07)
    yield "gct-claims-2", _put(data, 10, "B", flags & ~0x07)
    yield "gct-missing", _put(data, 10, "B", flags & 0x7F)


def _bmp_palette_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    for count in (1, 300, 2**32 - 1):
        yield f"clrused={count}", _put(data, 46, "<I", count)


def _tga_palette_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    for count in (0, 1, 65535):
        yield f"cmap-length={count}", _put(data, 5, "<H", count)
    yield "cmap-first=65535", _put(data, 3, "<H", 65535)
    yield "cmap-depth=99", _put(data, 7, "B", 99)


def _pcx_palette_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    yield "palette-cut", data[:-400]
    yield "palette-marker", _put(data, len(data) - 769, "B", 0)


def _tiff_palette_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    yield "colormap-count=3", _tiff_count(data, 320, 3)
    yield "colormap-count=huge", _tiff_count(data, 320, 2**31 - 1)


_PALETTE_LIES: dict[str, Callable[[bytes], Iterator[tuple[str, bytes]]]] = {
    "BMP": _bmp_palette_lies,
    "GIF": _gif_palette_lies,
    "PCX": _pcx_palette_lies,
    "PNG": _png_palette_lies,
    "TGA": _tga_palette_lies,
    "TIFF": _tiff_palette_lies,
}


# --------------------------------------------------------------------------- length lies


def _png_length_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    idat = png_chunks(data)
    size = len(next(p for t, p in idat if t == b"IDAT"))
    yield "idat-len=huge", _png_raw_length(data, b"IDAT", 2**31 - 1)
    yield "idat-len=short", _png_raw_length(data, b"IDAT", max(size - 10, 0))
    yield "ihdr-len=0", _png_raw_length(data, b"IHDR", 0)
    yield "ihdr-bad-crc", _put(data, 29, ">I", 0)
    yield "idat-garbage", _png_replace(data, b"IDAT", lambda p: bytes(255 - b for b in p))


def _jpeg_length_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    app0 = _jpeg_segment(data, frozenset({0xE0}))
    for length in (0, 1, 65535):
        yield f"app0-len={length}", _put(data, app0 + 2, ">H", length)
    sos = _jpeg_segment(data, frozenset({0xDA}))
    yield "sos-len=65535", _put(data, sos + 2, ">H", 65535)
    dqt = _jpeg_segment(data, frozenset({0xDB}))
    yield "dqt-len=2", _put(data, dqt + 2, ">H", 2)
    yield "sof-components=0", _put(data, _jpeg_segment(data, _SOF_MARKERS) + 9, "B", 0)


def _gif_length_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    at = _gif_descriptor(data)
    local = data[at + 9]
    table = 3 * 2 ** ((local & 7) + 1) if local & 0x80 else 0
    lzw = at + 10 + table  # LZW minimum code size, then the first sub-block length
    yield "lzw-min=12", _put(data, lzw, "B", 12)
    yield "lzw-min=0", _put(data, lzw, "B", 0)
    yield "subblock-len=255", _put(data, lzw + 1, "B", 255)


def _webp_length_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    yield "riff-len=0", _put(data, 4, "<I", 0)
    yield "riff-len=huge", _put(data, 4, "<I", 2**32 - 1)
    yield "vp8-len=huge", _put(data, 16, "<I", 2**32 - 1)
    yield "vp8-len=0", _put(data, 16, "<I", 0)


def _bmp_length_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    yield "offbits=huge", _put(data, 10, "<I", 2**32 - 1)
    yield "offbits=0", _put(data, 10, "<I", 0)
    yield "infosize=0", _put(data, 14, "<I", 0)
    yield "infosize=65535", _put(data, 14, "<I", 65535)
    yield "bitcount=0", _put(data, 28, "<H", 0)


def _tiff_length_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    yield "stripbytecounts=huge", _tiff_set(data, 279, 2**32 - 1)
    yield "stripoffsets=huge", _tiff_set(data, 273, 2**32 - 1)
    yield "ifd-offset=huge", _put(data, 4, "<I" if data[:2] == b"II" else ">I", 2**32 - 1)
    order, _ = _tiff_entries(data)
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    yield "ifd-count=65535", _put(data, ifd, order + "H", 65535)
    yield "bitspersample=0", _tiff_set(data, 258, 0)


def _ico_length_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    yield "entry-size=huge", _put(data, 14, "<I", 2**32 - 1)
    yield "entry-offset=huge", _put(data, 18, "<I", 2**32 - 1)
    yield "image-count=65535", _put(data, 4, "<H", 65535)
    yield "entry-size=0", _put(data, 14, "<I", 0)


def _avif_length_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    yield "ftyp-len=huge", _put(data, 0, ">I", 2**32 - 1)
    yield "ftyp-len=0", _put(data, 0, ">I", 0)
    meta = data.index(b"meta") - 4
    yield "meta-len=huge", _put(data, meta, ">I", 2**32 - 1)


def _tga_length_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    yield "id-length=255", _put(data, 0, "B", 255)
    yield "depth=0", _put(data, 16, "B", 0)


def _dds_length_lies(data: bytes) -> Iterator[tuple[str, bytes]]:
    yield "header-size=0", _put(data, 4, "<I", 0)
    yield "pitch=huge", _put(data, 20, "<I", 2**32 - 1)


_LENGTH_LIES: dict[str, Callable[[bytes], Iterator[tuple[str, bytes]]]] = {
    "AVIF": _avif_length_lies,
    "BMP": _bmp_length_lies,
    "DDS": _dds_length_lies,
    "GIF": _gif_length_lies,
    "ICO": _ico_length_lies,
    "JPEG": _jpeg_length_lies,
    "PNG": _png_length_lies,
    "TGA": _tga_length_lies,
    "TIFF": _tiff_length_lies,
    "WEBP": _webp_length_lies,
}
