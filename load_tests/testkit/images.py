"""Deterministic synthetic test images (no photos can be downloaded here).

``image_corpus()`` returns ``(name, encoded bytes)`` pairs covering the formats, modes, sizes, aspect ratios
and EXIF orientations that preprocessing must handle. Every image has different content (seeded shapes,
gradients and text), so the pixels and the caption scores differ per image.

``python -m load_tests.testkit.images samples/`` regenerates the small sample images committed under ``samples/``.
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_SHAPES = ("ellipse", "rectangle", "polygon", "line")


def synthetic_rgb(width: int, height: int, seed: int, text: str | None = None) -> Image.Image:
    """An RGB image with a seeded two-colour gradient background, random shapes and optional text."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    fx = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    fy = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    c0 = nrng.integers(0, 256, 3).astype(np.float32)
    c1 = nrng.integers(0, 256, 3).astype(np.float32)
    angle = np.float32(rng.random())
    t = angle * fx + (1 - angle) * fy
    bg = c0 + (c1 - c0) * t
    # A little texture so that JPEG/WebP encoders and bicubic filtering have something to work on.
    xs = np.arange(width, dtype=np.float32)[None, :, None]
    ys = np.arange(height, dtype=np.float32)[:, None, None]
    bg += (
        12
        * np.sin(xs / np.float32(3 + 7 * rng.random()) + np.arange(3, dtype=np.float32))
        * np.cos(ys / np.float32(5 + 9 * rng.random()))
    )
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 9)):
        kind = rng.choice(_SHAPES)
        x0, x1 = sorted(rng.uniform(-0.1, 1.1) * width for _ in range(2))
        y0, y1 = sorted(rng.uniform(-0.1, 1.1) * height for _ in range(2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        if kind == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=colour, outline=(0, 0, 0))
        elif kind == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == "polygon":
            pts = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(rng.randint(3, 6))]
            draw.polygon(pts, fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=max(1, min(width, height) // 40))
    if text:
        fs = max(8, min(width, height) // 8)
        try:
            draw.text(
                (width * 0.05, height * 0.4),
                text,
                fill=(255, 255, 255),
                font_size=fs,
                stroke_width=1,
                stroke_fill=(0, 0, 0),
            )
        except (OSError, TypeError):  # no FreeType: fall back to the bitmap font
            draw.text((width * 0.05, height * 0.4), text, fill=(255, 255, 255))
    return img


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    """Encode a PIL image to bytes in the given format."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def exif_with_orientation(orientation: int) -> Image.Exif:
    """An EXIF block holding only an Orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def palette_with_transparency(seed: int) -> bytes:
    """A palette (P) PNG whose colour index 0 is transparent."""
    img = synthetic_rgb(320, 240, seed, "P").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    return encode(img, "PNG", transparency=0)


def rgba_png(seed: int) -> bytes:
    """An RGBA PNG with an alpha gradient and a fully transparent hole."""
    img = synthetic_rgb(500, 400, seed, "RGBA").convert("RGBA")
    a = np.tile(np.linspace(0, 255, 500, dtype=np.float32), (400, 1))
    a[100:200, 150:300] = 0
    img.putalpha(Image.fromarray(a.astype(np.uint8), "L"))
    return encode(img, "PNG")


def _with_alpha(img: Image.Image) -> Image.Image:
    """RGBA copy of ``img`` with a radial alpha ramp (so that encoders keep the alpha channel)."""
    w, h = img.size
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(xx - w / 2, yy - h / 2) / (0.5 * np.hypot(w, h))
    out = img.convert("RGBA")
    out.putalpha(Image.fromarray((255 * (1 - r)).clip(0, 255).astype(np.uint8), "L"))
    return out


def png16(seed: int) -> bytes:
    """A 16-bit grayscale PNG (mode I;16), values spanning the whole 16-bit range."""
    g = np.asarray(synthetic_rgb(400, 300, seed).convert("L"), dtype=np.uint16)
    # Pillow's I;16 -> RGB conversion clips at 255: double the values so that half the pixels clip.
    img = Image.fromarray((g * 2).astype(np.uint16))  # mode I;16
    return encode(img, "PNG")


def la_png(seed: int) -> bytes:
    """A grayscale + alpha (LA) PNG."""
    img = synthetic_rgb(256, 320, seed).convert("LA")
    return encode(img, "PNG")


def cmyk_jpeg(seed: int) -> bytes:
    """A CMYK JPEG (Pillow writes Adobe-style CMYK)."""
    return encode(synthetic_rgb(400, 300, seed, "CMYK").convert("CMYK"), "JPEG", quality=90)


def animated_gif(seed: int, frames: int = 3) -> bytes:
    """An animated GIF whose frames differ completely (the first frame is what must be used)."""
    imgs = [synthetic_rgb(160, 120, seed + 31 * k, f"F{k}") for k in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=100, loop=0)
    return buf.getvalue()


def multipage_tiff(seed: int, pages: int = 3) -> bytes:
    """A multi-page TIFF whose pages differ (the first page is what must be used)."""
    imgs = [synthetic_rgb(200, 150, seed + 17 * k, f"P{k}") for k in range(pages)]
    buf = io.BytesIO()
    imgs[0].save(buf, format="TIFF", save_all=True, append_images=imgs[1:])
    return buf.getvalue()


def image_corpus() -> list[tuple[str, bytes]]:
    """The test corpus: >= 12 varied encoded images, deterministic for a given Pillow version."""
    c: list[tuple[str, bytes]] = []
    c.append(("tiny_rgb.png", encode(synthetic_rgb(7, 5, 1), "PNG")))
    c.append(("large_4000x3000.jpg", encode(synthetic_rgb(4000, 3000, 2, "LARGE"), "JPEG", quality=85)))
    c.append(("panorama_1200x200.jpg", encode(synthetic_rgb(1200, 200, 3, "wide"), "JPEG", quality=90)))
    c.append(("tall_150x900.png", encode(synthetic_rgb(150, 900, 4, "T"), "PNG")))
    c.append(("exact_480.png", encode(synthetic_rgb(480, 480, 5, "480"), "PNG")))
    c.append(("gray_L.jpg", encode(synthetic_rgb(640, 480, 6, "gray").convert("L"), "JPEG", quality=90)))
    c.append(("rgba.png", rgba_png(7)))
    c.append(("palette_transparent.png", palette_with_transparency(8)))
    c.append(
        (
            "exif_orient6.jpg",
            encode(synthetic_rgb(640, 360, 9, "rot6"), "JPEG", quality=90, exif=exif_with_orientation(6)),
        )
    )
    c.append(
        (
            "exif_orient8.jpg",
            encode(synthetic_rgb(300, 500, 10, "rot8"), "JPEG", quality=90, exif=exif_with_orientation(8)),
        )
    )
    c.append(("lossy.webp", encode(synthetic_rgb(512, 384, 11, "webp"), "WEBP", quality=80)))
    c.append(("lossless_rgba.webp", encode(_with_alpha(synthetic_rgb(300, 300, 12)), "WEBP", lossless=True)))
    c.append(("bitmap.bmp", encode(synthetic_rgb(300, 200, 13, "bmp"), "BMP")))
    c.append(("palette.gif", encode(synthetic_rgb(256, 256, 14, "gif").convert("P"), "GIF")))
    c.append(("gray16.png", png16(15)))
    c.append(("cmyk.jpg", cmyk_jpeg(16)))
    c.append(("gray_alpha_LA.png", la_png(17)))
    c.append(("rgb.tiff", encode(synthetic_rgb(333, 222, 18, "tif"), "TIFF")))
    return c


def write_samples(out_dir: str | Path) -> list[Path]:
    """Write the small sample images committed under ``samples/`` (JPEG, PNG, WebP; together < 300 KB)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [
        ("shapes.jpg", synthetic_rgb(640, 480, 101, "shapes"), "JPEG", {"quality": 85}),
        ("gradient.png", synthetic_rgb(320, 240, 102), "PNG", {"optimize": True}),
        ("text_banner.webp", synthetic_rgb(800, 200, 103, "hello OFA"), "WEBP", {"quality": 80}),
        ("portrait.jpg", synthetic_rgb(360, 640, 104, "tall"), "JPEG", {"quality": 85}),
        ("square.webp", synthetic_rgb(480, 480, 105, "480"), "WEBP", {"quality": 80}),
        ("small_icon.png", synthetic_rgb(64, 64, 106), "PNG", {"optimize": True}),
        (
            "rotated_exif6.jpg",
            synthetic_rgb(480, 320, 107, "EXIF 6"),
            "JPEG",
            {"quality": 85, "exif": exif_with_orientation(6)},
        ),
        ("grayscale.png", synthetic_rgb(400, 300, 108, "gray").convert("L"), "PNG", {"optimize": True}),
    ]
    paths = []
    for name, img, fmt, kw in specs:
        p = out / name
        p.write_bytes(encode(img, fmt, **kw))
        paths.append(p)
    return paths


if __name__ == "__main__":
    for p in write_samples(sys.argv[1] if len(sys.argv) > 1 else "samples"):
        print(f"{p} {p.stat().st_size} bytes")
