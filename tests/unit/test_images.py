"""Image headers: the format from the signature, the size from the header, None for anything else."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from llmrelay_server import images
from support import jpeg, png


def webp(chunk: bytes, body: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(body)) + b"WEBP" + chunk + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(
    ("data", "media_type", "size"),
    [
        (png(640, 480), "image/png", (640, 480)),
        (jpeg(1920, 1080), "image/jpeg", (1920, 1080)),
        (jpeg(300, 200, frame=0xC2), "image/jpeg", (300, 200)),  # progressive
        (b"GIF89a" + struct.pack("<HH", 500, 20) + b"\x00\x00\x00", "image/gif", (500, 20)),
        (b"GIF87a" + struct.pack("<HH", 1, 2), "image/gif", (1, 2)),
        # Lossy: frame tag, start code, 14-bit sizes (the top two bits are a scale, not size).
        (webp(b"VP8 ", b"\x9d\x01\x00\x9d\x01\x2a" + struct.pack("<HH", 0xC000 | 800, 600)), "image/webp", (800, 600)),
        # Lossless: 0x2f, then width - 1 and height - 1 in 14 bits each.
        (webp(b"VP8L", b"\x2f" + struct.pack("<I", (1023 << 14) | 511)), "image/webp", (512, 1024)),
        # Extended: flags, reserved, then the canvas size less one in 24 bits each.
        (webp(b"VP8X", b"\x10\x00\x00\x00" + (4999).to_bytes(3, "little") + (2).to_bytes(3, "little")), "image/webp",
         (5000, 3)),
    ],
)  # fmt: skip
def test_the_format_and_size_of_each_kind(data: bytes, media_type: str, size: tuple[int, int]) -> None:
    assert images.media_type(data) == media_type
    assert images.dimensions(data) == size


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"BM\x00\x00",  # BMP: not a format upstreams take
        png(10, 10)[:20],  # cut inside IHDR
        png(0, 10),  # a zero size
        b"\xff\xd8\xff\xe0\x00\x10JFIF",  # cut before any frame
        b"\xff\xd8\xff\xda\x00\x08" + bytes(8),  # image data before a frame header
        b"\xff\xd8\xff\xe0\x00\x00",  # a segment length that cannot be
        jpeg(10, 10)[:-6],  # cut inside the frame header
        b"GIF89a\x01",
        webp(b"VP8 ", b"\x00\x00\x00garbage!"),  # no start code
        webp(b"ALPH", bytes(10)),
    ],
)
def test_no_size_from_what_is_not_a_readable_header(data: bytes) -> None:
    assert images.dimensions(data) is None


SIGNATURES = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF....WEBPVP8L",
]


@given(signature=st.sampled_from(SIGNATURES), rest=st.binary(max_size=64))
def test_any_bytes_give_a_size_or_none_and_never_raise(signature: bytes, rest: bytes) -> None:
    data = signature + rest
    size = images.dimensions(data)
    assert size is None or (size[0] > 0 and size[1] > 0 and images.media_type(data) is not None)


MIB = 1024 * 1024
# A segment of nothing (a comment, length 2): the smallest a segment can be.
EMPTY_COMMENT = b"\xff\xfe\x00\x02"


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (b"\xff\xd8" + b"\xff" * (4 * MIB), None),  # fill bytes to the end
        (jpeg(640, 480)[:2] + b"\xff" * (4 * MIB) + jpeg(640, 480)[2:], (640, 480)),  # fill bytes before a marker
        (b"\xff\xd8" + EMPTY_COMMENT * 1000 + jpeg(64, 48)[2:], (64, 48)),
        # Tiny segments to the end: the walk stops after _JPEG_MAX_SEGMENTS of them rather than take one step for
        # every 4 bytes.
        (b"\xff\xd8" + EMPTY_COMMENT * MIB, None),
    ],
    ids=["fill-to-the-end", "fill-before-a-marker", "many-segments", "segments-to-the-end"],
)
def test_a_jpeg_header_is_read_in_a_bounded_walk(data: bytes, size: tuple[int, int] | None) -> None:
    assert images.dimensions(data) == size
