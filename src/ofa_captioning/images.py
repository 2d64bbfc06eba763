"""Image decoding and pixel preprocessing, with the exact semantics of ModelScope's OFA captioning.

The reference (ModelScope ``LoadImage`` + ``OfaImageCaptioningPreprocessor``) does::

    img = PIL.Image.open(io.BytesIO(data))          # first frame of animated GIF / multi-page TIFF
    img = ImageOps.exif_transpose(img)
    img = img.convert("RGB")                         # LoadImage, and again in the transform (a no-op)
    img = img.resize((S, S), Image.BICUBIC)          # torchvision Resize((S, S), BICUBIC) on a PIL image
    x = ToTensor(img)                                # uint8 HWC -> float32 CHW, / 255
    x = (x - mean) / std                             # torchvision Normalize, float32

This module does the same PIL calls in the same order and reproduces the float32 arithmetic bit for bit
(via a per-channel 256-entry lookup table computed with the reference's operations), without torchvision.
It also refuses undecodable input and decompression bombs with :class:`ImageDecodeError`.

:func:`preprocess_images` computes the reference's float32 pixels in one go. Split in two, the same arithmetic
moves 4x fewer bytes between processes and devices:

* :func:`resized_pixels` (host, PIL): decode, EXIF, RGB, bicubic resize to S x S, as ``uint8 [B, 3, S, S]``;
* :func:`normalize_pixels` (the model's device, torch): ``(v / 255 - mean) / std`` for every byte ``v``, looked up
  in the same float32 table (:func:`normalize_lut`) as the one-step path, so the float32 tensor the model sees is
  identical bit for bit.

The Triton ensemble uses this split: ``preprocess`` sends the uint8 pixels through shared memory and ``ofa``
normalizes them where the model runs (``Captioner.normalize_pixels``). torch is imported by
:func:`normalize_pixels` only, so decoding and resizing (the ``preprocess`` model) need numpy and Pillow alone.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "ImageInput",
    "load_image",
    "decoded_images",
    "normalize_lut",
    "normalize_pixels",
    "preprocess_image",
    "preprocess_images",
    "resized_pixels",
]

#: Default limit on width * height read from the image header (before any pixel is decoded).
DEFAULT_MAX_PIXELS = 40_000_000

ImageInput = bytes | bytearray | memoryview | Image.Image

_FORMATS = "JPEG, PNG, WebP, BMP, GIF, TIFF"
_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset(range(2, 9))


class ImageDecodeError(ValueError):
    """The input is not a decodable image (or is larger than the configured pixel limit)."""


_strict_lock = threading.Lock()
_strict_depth = 0
_strict_saved = False


@contextlib.contextmanager
def _refuse_truncated() -> Iterator[None]:
    """Decode with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off, whatever other code in the process set it to.

    Pillow reads that process-wide flag while decoding, and some libraries switch it on at import time
    (ModelScope's OFA preprocessors do, which makes the reference pad truncated files with grey instead of
    failing). A truncated upload is an error here. The override is reference-counted, so concurrent decodes
    neither serialise nor restore the flag under each other's feet; when nobody changed the flag it is a no-op.
    """
    global _strict_depth, _strict_saved
    with _strict_lock:
        active = _strict_depth > 0 or ImageFile.LOAD_TRUNCATED_IMAGES
        if active:
            if _strict_depth == 0:
                _strict_saved = ImageFile.LOAD_TRUNCATED_IMAGES
            _strict_depth += 1
            ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        if active:
            with _strict_lock:
                _strict_depth -= 1
                if _strict_depth == 0:
                    ImageFile.LOAD_TRUNCATED_IMAGES = _strict_saved


def _open(data: ImageInput, max_pixels: int | None) -> Image.Image:
    if isinstance(data, Image.Image):
        img = data
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageDecodeError(f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
        return img
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected encoded image bytes or a PIL.Image.Image, got {type(data).__name__}")
    raw = bytes(data)
    if not raw:
        raise ImageDecodeError(f"empty input: expected the bytes of an encoded image ({_FORMATS})")
    try:
        img = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(
            f"not a decodable image: {len(raw)} bytes starting with {raw[:8]!r} are not a supported image "
            f"({_FORMATS}) or are corrupt"
        ) from e
    except Exception as e:  # whatever a format plugin raises on a broken header
        raise ImageDecodeError(
            f"corrupt image header ({len(raw)} bytes, starts with {raw[:8]!r}): {e}"
        ) from e
    # Only the header has been read so far: refuse bombs before allocating their pixels.
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageDecodeError(f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"image has an invalid size {w}x{h}")
    return img


def load_image(data: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image as the reference does: first frame, EXIF orientation applied, mode RGB.

    ``data`` is the encoded file (JPEG, PNG, WebP, BMP, GIF, TIFF, ... whatever Pillow opens) or a
    ``PIL.Image.Image``. A PIL image is used at its current frame and is not modified (it is returned as is
    when it is already RGB and upright). Images with more than ``max_pixels`` pixels (``None``: no limit of
    ours; Pillow's own decompression-bomb limit still applies) are refused from their header, before any pixel
    is decoded. Raises :class:`ImageDecodeError` for anything that cannot be decoded, and ``TypeError`` for
    inputs that are neither bytes nor PIL images.
    """
    with _refuse_truncated():
        img = _open(data, max_pixels)
        fmt = img.format or "image"
        try:
            img.load()
            # ImageOps.exif_transpose returns a copy when there is nothing to do; skipping that copy keeps
            # the pixels identical and saves a full-size allocation.
            if img.getexif().get(_ORIENTATION, 1) in _TRANSPOSING_ORIENTATIONS:
                img = ImageOps.exif_transpose(img)
            if img.mode != "RGB":
                img = img.convert("RGB")
        except Exception as e:  # truncated files, corrupt data streams, broken EXIF, ...
            raise ImageDecodeError(f"corrupt or truncated {fmt} data ({img.width}x{img.height}): {e}") from e
    return img


_LUT_CACHE: dict[tuple[tuple[float, ...], tuple[float, ...]], np.ndarray] = {}


def normalize_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 table [3, 256]: the reference's ``(float32(v) / 255 - mean[c]) / std[c]`` for each byte value v."""
    key = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
    lut = _LUT_CACHE.get(key)
    if lut is None:
        if len(key[0]) != 3 or len(key[1]) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
        if any(s == 0 for s in key[1]):
            raise ValueError(f"std must not contain 0, got {list(std)}")
        v = np.arange(256, dtype=np.float32) / np.float32(255)  # ToTensor: float32 division by 255
        m = np.asarray(key[0], dtype=np.float32)[:, None]
        s = np.asarray(key[1], dtype=np.float32)[:, None]
        lut = np.ascontiguousarray((v[None, :] - m) / s, dtype=np.float32)  # Normalize: sub_ then div_
        lut.setflags(write=False)
        _LUT_CACHE[key] = lut
    return lut


def _pixels_into(img: Image.Image, size: int, lut: np.ndarray, out: np.ndarray) -> None:
    resized = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(resized)  # [S, S, 3] uint8
    for c in range(3):
        np.take(lut[c], arr[:, :, c], out=out[c])


def preprocess_image(
    image: ImageInput,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """One image -> float32 ``[3, size, size]``: :func:`load_image`, bicubic resize to size x size, normalize."""
    return preprocess_images([image], size=size, mean=mean, std=std, max_pixels=max_pixels)[0]


def preprocess_images(
    images: Iterable[ImageInput],
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Images (encoded bytes or PIL) -> float32 ``[B, 3, size, size]`` pixel batch, as the reference computes it.

    The aspect ratio is not kept (the reference resizes to a square). Raises :class:`ImageDecodeError` naming
    the index of the first image that cannot be decoded.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    lut = normalize_lut(mean, std)
    items = list(images)
    out = np.empty((len(items), 3, size, size), dtype=np.float32)
    for i, img in decoded_images(items, max_pixels):
        _pixels_into(img, size, lut, out[i])
        del img  # free this decoded image before the next one is decoded
    return out


def decoded_images(
    items: Sequence[ImageInput], max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Iterator[tuple[int, Image.Image]]:
    """``(index, image)`` for each item, decoded by :func:`load_image` one at a time: the caller reduces each to
    its pixels before asking for the next, so one full-size decoded image is alive at a time. A bad image raises
    :class:`ImageDecodeError`, naming its index when there are several. Callers drop their reference to an
    image before the next iteration (``del``), or two full-size images are alive while the next one decodes."""
    for i, item in enumerate(items):
        try:
            img = load_image(item, max_pixels=max_pixels)
        except ImageDecodeError as e:
            if len(items) == 1:
                raise
            raise ImageDecodeError(f"image {i}: {e}") from e
        yield i, img
        del img  # this generator's reference


# ------------------------------------------------------------------------------------- the uint8 pixel path

_DEVICE_LUTS: dict[tuple[tuple[float, ...], tuple[float, ...], torch.device], torch.Tensor] = {}


def resized_pixels(
    images: Iterable[ImageInput], *, size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Images (encoded bytes or PIL) -> ``uint8 [B, 3, size, size]``: the reference's RGB pixels after its
    bicubic resize, before ``ToTensor`` and ``Normalize``. Errors as :func:`preprocess_images` (the bad image's
    index is named)."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    items = list(images)
    out = np.empty((len(items), 3, size, size), dtype=np.uint8)
    for i, img in decoded_images(items, max_pixels):
        resized = img.resize((size, size), Image.Resampling.BICUBIC)
        del img  # free this decoded image before the next one is decoded
        out[i] = np.asarray(resized).transpose(2, 0, 1)  # HWC -> CHW
    return out


def normalize_pixels(
    pixels: torch.Tensor | np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` (or one image ``[3, H, W]``) -> float32 ``[B, 3, H, W]`` on ``device`` (default:
    where ``pixels`` are), equal bit for bit to :func:`preprocess_images`.

    The bytes travel to the device first (a quarter of the float32 size) and are normalized there by a gather
    from the per-channel 256-entry table.
    """
    import torch

    if isinstance(pixels, np.ndarray):
        pixels = torch.from_numpy(np.ascontiguousarray(pixels))
    if pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be uint8, got {pixels.dtype}")
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(0)
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must have shape [B,3,H,W], got {list(pixels.shape)}")
    device = pixels.device if device is None else torch.device(device)
    if device.type == "cpu":
        # numpy's per-channel take is about 3x faster than torch's gathers on a CPU (measured, 8 x 480 x 480).
        table = normalize_lut(mean, std)
        host = pixels.cpu().numpy()
        out = np.empty(host.shape, dtype=np.float32)
        for c in range(3):
            np.take(table[c], host[:, c], out=out[:, c])
        return torch.from_numpy(out)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _normalize_on_device(pixels, mean, std, device)


def _normalize_on_device(
    pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device
) -> torch.Tensor:
    """The accelerator path of :func:`normalize_pixels` (a torch gather; runs on any device, tested on the CPU)."""
    import torch

    lut = _device_lut(mean, std, device)
    pixels = pixels.to(device, non_blocking=True)
    # Channel c reads row c of the table: index c * 256 + v in the flattened [3 * 256] table.
    offsets = torch.arange(0, 3 * 256, 256, device=device, dtype=torch.int32).view(1, 3, 1, 1)
    return lut.index_select(0, (pixels.to(torch.int32) + offsets).flatten()).view(pixels.shape)


def _device_lut(mean: Sequence[float], std: Sequence[float], device: torch.device) -> torch.Tensor:
    """:func:`normalize_lut` flattened to ``[3 * 256]`` on ``device`` (one copy per device, kept)."""
    import torch

    key = (tuple(float(m) for m in mean), tuple(float(s) for s in std), device)
    lut = _DEVICE_LUTS.get(key)
    if lut is None:
        lut = torch.from_numpy(normalize_lut(mean, std).copy()).reshape(-1).to(device)
        _DEVICE_LUTS[key] = lut
    return lut
