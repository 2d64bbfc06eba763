"""Hostile, broken and unusual image payloads for the hardening tests (deterministic, built in memory)."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
from PIL import Image

from load_tests.testkit.images import (
    animated_gif,
    cmyk_jpeg,
    encode,
    multipage_tiff,
    palette_with_transparency,
    png16,
    synthetic_rgb,
)

__all__ = [
    "animated_gif",
    "cmyk_jpeg",
    "multipage_tiff",
    "palette_with_transparency",
    "png16",
    "png_bomb",
    "noise_png",
    "random_bytes",
    "truncated",
    "png_with_garbage_body",
    "jpeg_with_garbage_body",
    "frame_as_png",
    "rgb_png_of",
    "plain_png",
    "jpeg",
]


def plain_png(width: int, height: int, seed: int) -> bytes:
    return encode(synthetic_rgb(width, height, seed), "PNG")


def jpeg(width: int, height: int, seed: int) -> bytes:
    return encode(synthetic_rgb(width, height, seed), "JPEG", quality=90)


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first ``keep`` fraction of an encoded file (a cut-off upload)."""
    return data[: int(len(data) * keep)]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bomb(width: int, height: int) -> bytes:
    """A *valid* 1-bit grayscale PNG of ``width`` x ``height`` black pixels, compressed about 1000:1.

    30000 x 30000 is 900 M pixels in about 110 KB: decoding it would take 900 MB (Pillow keeps 1-bit images at one
    byte per pixel) and 2.7 GB once converted to RGB.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0 + packed bits
    compressor = zlib.compressobj(9)
    parts = []
    for _ in range(height // 256):
        parts.append(compressor.compress(row * 256))
    parts.append(compressor.compress(row * (height % 256)))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return _PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def png_with_garbage_body(width: int, height: int, seed: int) -> bytes:
    """A PNG with a valid signature and IHDR (so it opens) whose pixel data is random bytes (valid CRCs)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        _PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", random_bytes(2048, seed))
        + _chunk(b"IEND", b"")
    )


def jpeg_with_garbage_body(seed: int) -> bytes:
    """A real JPEG's headers (up to and including the start-of-scan segment) followed by random bytes."""
    data = jpeg(320, 240, seed)
    sos = data.index(b"\xff\xda")
    header_end = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    body = bytes(b if b != 0xFF else 0x00 for b in random_bytes(4096, seed))  # no markers in the body
    return data[:header_end] + body + b"\xff\xd9"


def noise_png(width: int, height: int, seed: int) -> bytes:
    """An RGB PNG of random noise: PNG cannot compress it, so the file is about ``3 * width * height`` bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels, "RGB"), "PNG")


def frame_as_png(data: bytes, index: int) -> bytes:
    """Frame/page ``index`` of an animated GIF or multi-page TIFF, as an RGB PNG (decoded by Pillow alone)."""
    with Image.open(io.BytesIO(data)) as img:
        img.seek(index)
        return encode(img.convert("RGB"), "PNG")


def rgb_png_of(data: bytes) -> bytes:
    """``data`` decoded and converted to RGB by Pillow, as a PNG: what a correct server must caption identically."""
    with Image.open(io.BytesIO(data)) as img:
        return encode(img.convert("RGB"), "PNG")
