"""What the gateway reads from an image's bytes without decoding it: the format, from its signature, and the width
and height, from its header.

Enough to check that bytes are what their media type says (before an upstream refuses them with a less helpful
message) and to count an image's tokens by its size; pure functions over the first bytes of PNG, JPEG, GIF and WebP,
so no imaging library is needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Final

PNG: Final = "image/png"
JPEG: Final = "image/jpeg"
GIF: Final = "image/gif"
WEBP: Final = "image/webp"
MEDIA_TYPES: Final = (PNG, JPEG, GIF, WEBP)
_JPG: Final = "image/jpg"
"""JPEG's name by its files' extension: no registered type, but what many clients send."""


def canonical_media_type(media_type: str) -> str:
    """A media type as MEDIA_TYPES names it: lower-case (a type and subtype are case-insensitive, RFC 2045: IMAGE/PNG
    is image/png), image/jpg as image/jpeg; "" for none. The upstreams take only the canonical names."""
    lowered = media_type.lower()
    return JPEG if lowered == _JPG else lowered


# JPEG's start-of-frame markers, which carry the size: C0-CF except C4 (Huffman tables), C8 (reserved) and CC
# (arithmetic coding conditioning).
_JPEG_FRAMES: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length: TEM, the restart markers and start of image.
_JPEG_BARE: Final = frozenset({0x01, *range(0xD0, 0xD9)})
# A marker's 0xFF, with the fill bytes (0xFF too, any number of them) that may come before its code: matched in one
# step, where a byte at a time would take the event loop half a second for a few MiB of them.
_JPEG_MARKER_START: Final = re.compile(rb"\xff+")
# The most segments walked to the frame header. Real files have a few (APP0/APP1, tables, ICC profile chunks) before
# it; bytes made of tiny segments would otherwise cost a step of Python per 4 bytes.
_JPEG_MAX_SEGMENTS: Final = 1024


def media_type(data: bytes) -> str | None:
    """The media type the bytes' signature says, or None when they are not PNG, JPEG, GIF or WebP."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if data.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return WEBP
    return None


def dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) in pixels from the header; None when the format is not known or the header is cut short or
    says zero."""
    kind = media_type(data)
    size = _READERS[kind](data) if kind is not None else None
    return size if size is not None and size[0] > 0 and size[1] > 0 else None


def _png(data: bytes) -> tuple[int, int] | None:
    # The signature, then the IHDR chunk first: length (4), type (4), width (4), height (4), big-endian.
    if data[12:16] != b"IHDR" or len(data) < 24:
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _gif(data: bytes) -> tuple[int, int] | None:
    # The logical screen descriptor after the 6-byte signature: width and height, 2 bytes each, little-endian.
    if len(data) < 10:
        return None
    return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")


def _webp(data: bytes) -> tuple[int, int] | None:
    # The first chunk after RIFF....WEBP says the encoding; each keeps the size in its own way (RFC 9649).
    chunk, body = data[12:16], data[20:30]
    if chunk == b"VP8X" and len(body) >= 10:  # extended: the canvas size less one, 24 bits each
        return int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1
    if chunk == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:  # lossless: 14 bits each, less one
        bits = int.from_bytes(body[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":  # lossy: after the key frame's code
        return int.from_bytes(body[6:8], "little") & 0x3FFF, int.from_bytes(body[8:10], "little") & 0x3FFF
    return None


def _jpeg(data: bytes) -> tuple[int, int] | None:
    # Segment by segment to the first start-of-frame, whose body is precision (1), height (2), width (2). A
    # segment's length counts itself, not the marker before it.
    position = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        marker_start = _JPEG_MARKER_START.match(data, position)
        if marker_start is None:
            return None
        position = marker_start.end()  # at the marker's code
        if position + 3 > len(data):  # the code and a length
            return None
        marker = data[position]
        if marker in _JPEG_BARE:
            position += 1
            continue
        length = int.from_bytes(data[position + 1 : position + 3], "big")
        if marker in _JPEG_FRAMES:
            frame = data[position + 3 : position + 8]
            return (int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big")) if len(frame) == 5 else None
        if marker == 0xDA or length < 2:  # image data before any frame header, or a broken length
            return None
        position += 1 + length
    return None


_READERS: Final[Mapping[str, Callable[[bytes], tuple[int, int] | None]]] = {
    PNG: _png,
    JPEG: _jpeg,
    GIF: _gif,
    WEBP: _webp,
}
