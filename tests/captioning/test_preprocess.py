"""Image decoding + pixel preprocessing: parity with ModelScope's reference, error handling, bomb guard."""

from __future__ import annotations

import io
import random
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from load_tests.testkit.images import animated_gif, encode, multipage_tiff, synthetic_rgb
from ofa_captioning.config import load_configs
from ofa_captioning.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    _normalize_on_device,
    load_image,
    normalize_lut,
    normalize_pixels,
    preprocess_image,
    preprocess_images,
    resized_pixels,
)

HALF = (0.5, 0.5, 0.5)
PIL_DEFAULT_BOMB_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # Image.MAX_IMAGE_PIXELS unless someone changed it
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pixels(data, size=64, mean=HALF, std=HALF, **kw):
    return preprocess_image(data, size=size, mean=mean, std=std, **kw)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)


def _bilevel_png(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG of width x height, all black, compressed row by row (small file)."""
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(height // 1000)]
    parts.append(comp.compress(row * (height % 1000)))
    parts.append(comp.flush())
    return _png_header(width, height, 1, 0) + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- reference parity


@pytest.mark.reference
def test_pixel_batch_matches_reference(reference, demo_checkpoint, image_corpus) -> None:
    _, task = load_configs(demo_checkpoint)
    images = [b for _, b in image_corpus]
    ours = preprocess_images(images, size=task.patch_image_size, mean=task.mean, std=task.std)
    ref = reference.pixels(images)
    assert ref.shape == (len(images), 3, reference.patch_image_size, reference.patch_image_size)
    assert ours.shape == tuple(ref.shape) and ours.dtype == np.float32
    diff = (torch.from_numpy(ours) - ref).abs().amax(dim=(1, 2, 3))
    bad = {name: float(d) for (name, _), d in zip(image_corpus, diff, strict=True) if d > 1e-5}
    assert not bad, f"pixels differ from the reference: {bad}"


@pytest.mark.reference
def test_first_frame_and_page_match_reference(reference) -> None:
    images = [animated_gif(40), multipage_tiff(41)]
    ours = preprocess_images(images, size=reference.patch_image_size, mean=HALF, std=HALF)
    assert torch.allclose(torch.from_numpy(ours), reference.pixels(images), rtol=0, atol=1e-5)


@pytest.mark.reference
def test_uint8_pixels_normalized_match_reference(reference, demo_checkpoint, image_corpus) -> None:
    _, task = load_configs(demo_checkpoint)
    images = [b for _, b in image_corpus]
    ours = normalize_pixels(resized_pixels(images, size=task.patch_image_size), task.mean, task.std)
    ref = reference.pixels(images)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert torch.allclose(ours, ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the uint8 path


@pytest.mark.parametrize(("mean", "std"), [(HALF, HALF), (IMAGENET_MEAN, IMAGENET_STD)])
def test_uint8_path_is_bit_exact_with_the_float32_path(image_corpus, mean, std) -> None:
    images = [b for _, b in image_corpus] + [animated_gif(40), multipage_tiff(41)]
    expected = preprocess_images(images, size=96, mean=mean, std=std)
    resized = resized_pixels(images, size=96)
    assert resized.dtype == np.uint8 and resized.shape == expected.shape
    assert resized.nbytes * 4 == expected.nbytes
    host = normalize_pixels(resized, mean, std)  # the CPU path (numpy table lookup)
    gathered = _normalize_on_device(torch.from_numpy(resized), mean, std, torch.device("cpu"))  # the GPU path
    for got in (host, gathered):
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert np.array_equal(
            got.numpy().view(np.int32), expected.view(np.int32)
        )  # same bits, not just close


def test_uint8_path_accepts_one_image_and_refuses_other_types() -> None:
    one = resized_pixels([encode(synthetic_rgb(50, 40, 3), "PNG")], size=32)[0]
    assert normalize_pixels(one, HALF, HALF).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="pixels must be uint8, got torch.float32"):
        normalize_pixels(torch.zeros(1, 3, 32, 32), HALF, HALF)
    with pytest.raises(ValueError, match=r"shape \[B,3,H,W\], got \[1, 4, 32, 32\]"):
        normalize_pixels(torch.zeros(1, 4, 32, 32, dtype=torch.uint8), HALF, HALF)
    with pytest.raises(ImageDecodeError, match="image 1: "):
        resized_pixels([encode(synthetic_rgb(50, 40, 3), "PNG"), b"not an image"], size=32)


def test_captioner_normalizes_uint8_pixels_as_it_preprocesses(demo_checkpoint, image_corpus) -> None:
    from ofa_captioning.captioner import Captioner

    captioner = Captioner.from_pretrained(demo_checkpoint)
    images = [b for _, b in image_corpus[:3]]
    got = captioner.normalize_pixels(resized_pixels(images, size=captioner.patch_image_size))
    assert got.device == captioner.device
    assert np.array_equal(got.numpy().view(np.int32), captioner.preprocess(images).numpy().view(np.int32))


def test_corpus_images_give_different_pixels(image_corpus) -> None:
    px = preprocess_images([b for _, b in image_corpus], size=64, mean=HALF, std=HALF)
    flat = px.reshape(len(px), -1)
    for i in range(len(px)):
        for j in range(i + 1, len(px)):
            assert not np.array_equal(flat[i], flat[j]), (image_corpus[i][0], image_corpus[j][0])


# ---------------------------------------------------------------------------------------------- semantics


def test_load_image_is_pil_open_exif_transpose_convert_rgb(image_corpus) -> None:
    for name, data in image_corpus:
        expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        got = load_image(data)
        assert got.mode == "RGB", name
        assert got.size == expected.size, name
        assert np.array_equal(np.asarray(got), np.asarray(expected)), name


def test_exif_orientation_is_applied() -> None:
    img = synthetic_rgb(64, 32, 3, "R")
    for orientation, transpose in ((6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encode(img, "PNG", exif=exif)  # lossless, so pixels can be compared exactly
        got = load_image(data)
        assert got.size == (32, 64)
        assert np.array_equal(np.asarray(got), np.asarray(img.transpose(transpose)))


def test_resize_is_pil_bicubic_and_normalization_is_float32_exact() -> None:
    img = synthetic_rgb(300, 170, 4, "abc")
    for mean, std in ((HALF, HALF), (IMAGENET_MEAN, IMAGENET_STD)):
        got = _pixels(encode(img, "PNG"), size=48, mean=mean, std=std)
        x = (
            torch.from_numpy(np.array(img.resize((48, 48), Image.Resampling.BICUBIC)))
            .permute(2, 0, 1)
            .float()
            .div(255)
        )
        expected = x.sub(torch.tensor(mean).view(3, 1, 1)).div(torch.tensor(std).view(3, 1, 1))
        assert torch.equal(torch.from_numpy(got), expected)


def test_normalize_lut_matches_torch_arithmetic() -> None:
    lut = normalize_lut(IMAGENET_MEAN, IMAGENET_STD)
    v = torch.arange(256).float().div(255)
    expected = torch.stack([(v - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert lut.dtype == np.float32 and torch.equal(torch.from_numpy(lut.copy()), expected)
    assert not lut.flags.writeable


@pytest.mark.parametrize("mean,std", [((0.5, 0.5), HALF), (HALF, (0.5, 0.0, 0.5))])
def test_bad_mean_std_rejected(mean, std) -> None:
    with pytest.raises(ValueError):
        normalize_lut(mean, std)


def test_output_shapes_and_dtype(image_corpus) -> None:
    batch = preprocess_images([b for _, b in image_corpus[:3]], size=40, mean=HALF, std=HALF)
    assert batch.shape == (3, 3, 40, 40) and batch.dtype == np.float32 and batch.flags.c_contiguous
    one = _pixels(image_corpus[0][1], size=40)
    assert one.shape == (3, 40, 40) and np.array_equal(one, batch[0])
    assert preprocess_images([], size=40, mean=HALF, std=HALF).shape == (0, 3, 40, 40)
    with pytest.raises(ValueError):
        preprocess_images([image_corpus[0][1]], size=0, mean=HALF, std=HALF)


def test_pil_input_equals_bytes_input_and_is_not_modified(image_corpus) -> None:
    for name, data in image_corpus:
        pil = Image.open(io.BytesIO(data))
        mode, size = pil.mode, pil.size
        assert np.array_equal(_pixels(pil), _pixels(data)), name
        assert (pil.mode, pil.size) == (mode, size), name


def test_bytes_like_inputs_accepted(image_corpus) -> None:
    data = image_corpus[2][1]
    ref = _pixels(data)
    assert np.array_equal(_pixels(bytearray(data)), ref)
    assert np.array_equal(_pixels(memoryview(data)), ref)


def test_animated_gif_uses_first_frame() -> None:
    data = animated_gif(7)
    frames = []
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 3
        for k in range(3):
            im.seek(k)
            frames.append(_pixels(im.convert("RGB")))
    got = _pixels(data)
    assert np.array_equal(got, frames[0])
    assert not np.array_equal(got, frames[1]) and not np.array_equal(got, frames[2])


def test_multipage_tiff_uses_first_page() -> None:
    data = multipage_tiff(9)
    pages = []
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 3
        for k in range(3):
            im.seek(k)
            pages.append(_pixels(im.convert("RGB")))
    got = _pixels(data)
    assert np.array_equal(got, pages[0]) and not np.array_equal(got, pages[1])


# ---------------------------------------------------------------------------------------------- bad input


def _bad_inputs() -> dict[str, bytes]:
    rng = random.Random(0)
    jpg = encode(synthetic_rgb(200, 150, 1, "x"), "JPEG")
    png = encode(synthetic_rgb(200, 150, 2, "x"), "PNG")
    webp = encode(synthetic_rgb(200, 150, 3, "x"), "WEBP")
    gif = encode(synthetic_rgb(200, 150, 4).convert("P"), "GIF")
    sos = jpg.index(b"\xff\xda")  # start of the entropy-coded scan
    idat = png.index(b"IDAT")
    return {
        "empty": b"",
        "random bytes": rng.randbytes(2000),
        "text": b"hello, this is not an image\n" * 10,
        "html": b"<html><body>404 not found</body></html>",
        "truncated jpeg": jpg[: len(jpg) // 2],
        "truncated png": png[: len(png) // 2],
        "truncated webp": webp[: len(webp) // 2],
        "truncated gif": gif[: len(gif) // 2],
        "png signature only": png[:8],
        "jpeg marker only": jpg[:3],
        "jpeg header + garbage scan": jpg[: sos + 14] + rng.randbytes(3000) + b"\xff\xd9",
        "png header + garbage IDAT": png[: idat + 4] + rng.randbytes(len(png) - idat - 4),
        "webp RIFF header + garbage chunks": webp[:12] + rng.randbytes(len(webp) - 12),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_undecodable_input_raises_image_decode_error(name: str) -> None:
    data = _bad_inputs()[name]
    with pytest.raises(ImageDecodeError) as e:
        _pixels(data)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert any(w in msg for w in ("empty", "not a decodable image", "corrupt")), msg


def test_truncated_refused_even_if_pillow_flag_is_set(monkeypatch) -> None:
    # ModelScope's OFA preprocessors set ImageFile.LOAD_TRUNCATED_IMAGES = True at import time.
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    jpg = encode(synthetic_rgb(200, 150, 1, "x"), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        _pixels(jpg[: len(jpg) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for the code that wanted it
    assert _pixels(jpg).shape == (3, 64, 64)


def test_batch_error_names_the_bad_image(image_corpus) -> None:
    images = [image_corpus[0][1], image_corpus[1][1], b"not an image"]
    with pytest.raises(ImageDecodeError, match="image 2"):
        preprocess_images(images, size=32, mean=HALF, std=HALF)


@pytest.mark.parametrize("bad", ["a string path.jpg", 123, None, np.zeros((4, 4, 3), np.uint8)])
def test_wrong_input_type_is_a_type_error(bad) -> None:
    with pytest.raises(TypeError):
        _pixels(bad)


# ---------------------------------------------------------------------------------------------- bomb guard


def test_pixel_bomb_refused_from_header() -> None:
    # A complete, valid 30000 x 30000 PNG of about 100 KB: 900 megapixels (2.7 GB as RGB) if decoded.
    data = _bilevel_png(30_000, 30_000)
    assert len(data) < 200_000
    t0 = time.perf_counter()
    # Our limit, or Pillow's own guard where it is still on (ModelScope's import switches it off).
    with pytest.raises(ImageDecodeError, match=r"30000x30000|900000000 pixels"):
        _pixels(data)
    assert time.perf_counter() - t0 < 1.0


def test_pixel_limit_checked_before_decoding() -> None:
    # Only a header (no pixel data at all): the limit must fire before any decoding is attempted. The size is
    # under Pillow's own decompression-bomb threshold, so this is our guard.
    w, h = 8000, 6000
    assert DEFAULT_MAX_PIXELS < w * h < PIL_DEFAULT_BOMB_PIXELS
    header_only = _png_header(w, h) + _png_chunk(b"IEND", b"")
    with pytest.raises(
        ImageDecodeError, match=r"8000x6000 = 48000000 pixels, more than the limit of 40000000"
    ):
        _pixels(header_only)
    # Without our limit the same bytes get as far as decoding, and fail there.
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        _pixels(header_only, max_pixels=None)


def test_pixel_limit_is_configurable() -> None:
    data = encode(synthetic_rgb(100, 80, 5), "PNG")
    with pytest.raises(ImageDecodeError, match="more than the limit of 7999"):
        _pixels(data, max_pixels=7999)
    assert _pixels(data, max_pixels=8000).shape == (3, 64, 64)
    assert _pixels(data, max_pixels=None).shape == (3, 64, 64)
    pil = Image.open(io.BytesIO(data))
    with pytest.raises(ImageDecodeError, match="limit"):
        _pixels(pil, max_pixels=100)
