"""The image corpus the load tools send: files found by extension, and distinct bytes on every request.

Standard library and Pillow only: the Locust image (docker/locust/Dockerfile) runs the locustfile with this
module and the client beside it, without the product's server packages.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_IMAGE_DIR", "IMAGE_EXTENSIONS", "UniqueImages", "decodes", "find_images", "load_images"]

DEFAULT_IMAGE_DIR = Path(__file__).resolve().parents[1] / "samples"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Appended after the encoded image. Every decoder the engine uses (Pillow's JPEG, PNG, WebP, BMP, GIF and TIFF
# readers) stops at the end of the image data and ignores trailing bytes; UniqueImages checks that per image.
_NONCE_MARKER = b"\x00ofa-load-test-nonce:"


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, by extension, sorted by path)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_images(folder: str | os.PathLike, limit: int | None = None) -> list[tuple[str, bytes]]:
    """``(name, encoded bytes)`` of the images under ``folder``; raises if there is none."""
    paths = find_images(folder)
    if not paths:
        raise FileNotFoundError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    if limit is not None:
        paths = paths[:limit]
    return [(str(p.relative_to(folder)), p.read_bytes()) for p in paths]


def decodes(data: bytes) -> bool:
    """Whether Pillow decodes ``data`` completely (the check behind :class:`UniqueImages`)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:
        return False


class UniqueImages:
    """Thread-safe round robin over an image corpus that returns distinct bytes on every call.

    With ``unique=True`` each image gets ``_NONCE_MARKER + <process id>-<counter>`` appended, so no two requests
    carry the same tensor and Triton's response cache (keyed by the input tensors) never hits. Images whose
    decoder would not accept the trailing bytes (checked once, with Pillow) are sent unchanged and named in
    :attr:`not_unique`. ``unique=False`` sends the corpus as is (repeats are then cache hits on the server).
    """

    def __init__(self, images: Sequence[tuple[str, bytes]], *, unique: bool = True, check: bool = True):
        if not images:
            raise ValueError("UniqueImages needs at least one image")
        self.images = list(images)
        self.unique = unique
        self.not_unique: list[str] = []
        self._suffixable = [True] * len(self.images)
        if unique and check:
            for index, (name, data) in enumerate(self.images):
                if not decodes(data + _NONCE_MARKER + b"0-0"):
                    self._suffixable[index] = False
                    self.not_unique.append(name)
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._tag = f"{os.getpid()}-{id(self):x}".encode()

    def __len__(self) -> int:
        return len(self.images)

    def next(self) -> tuple[str, bytes]:
        """The next ``(name, bytes)``; the bytes differ from every earlier call's when ``unique``."""
        with self._lock:
            n = next(self._counter)
        index = n % len(self.images)
        name, data = self.images[index]
        if self.unique and self._suffixable[index]:
            data = data + _NONCE_MARKER + self._tag + b"-" + str(n).encode()
        return name, data
