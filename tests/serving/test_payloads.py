"""Image payloads on the wire: raw bytes pass through, base64 and data URLs are decoded, limits hold."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from ofa_serving.payloads import PayloadError, decode_image_payload


@pytest.fixture(scope="module")
def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (7, 5), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_raw_image_bytes_pass_through(png):
    assert decode_image_payload(png) == png


def test_base64_text_and_data_urls_are_decoded(png):
    text = base64.b64encode(png)
    assert decode_image_payload(text) == png
    assert decode_image_payload(text.decode()) == png
    assert decode_image_payload(b"data:image/png;base64," + text) == png
    assert decode_image_payload(b"data:image/png;base64," + base64.urlsafe_b64encode(png).rstrip(b"=")) == png
    assert decode_image_payload(text[:40] + b"\n" + text[40:]) == png  # wrapped base64 (base64 without -w0)


def test_text_that_is_not_padded_base64_goes_to_the_decoder_as_is():
    assert decode_image_payload(b"not an image") == b"not an image"
    assert decode_image_payload(b"hello") == b"hello"


def test_errors_say_what_is_wrong(png):
    with pytest.raises(PayloadError, match="empty image"):
        decode_image_payload(b"")
    with pytest.raises(PayloadError, match="not valid base64|neither"):
        decode_image_payload(b"data:image/png;base64,@@@")
    with pytest.raises(PayloadError, match=r"image too large: \d+ bytes, the limit is 10 bytes"):
        decode_image_payload(png, max_bytes=10)
    with pytest.raises(PayloadError, match="image too large"):
        decode_image_payload(base64.b64encode(png), max_bytes=10)
