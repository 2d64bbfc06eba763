"""Image payloads as they arrive on the wire, before the engine decodes them.

The ``image`` input of the ``caption`` ensemble is a BYTES tensor. tritonclient and the binary-data extension
of the HTTP protocol carry the encoded file as is. A plain KServe v2 JSON request cannot carry arbitrary
bytes in a JSON string, so base64 text (optionally as a ``data:image/...;base64,`` URL) is accepted too.
Base64 is recognised as standard-alphabet text with padding (line breaks allowed, as ``base64`` wraps it) or a
data URL (standard or URL-safe alphabet). Binary image files always contain bytes outside that alphabet, so
the two cannot be confused; anything else is handed to the image decoder as is, which names what it got.
"""

from __future__ import annotations

import base64
import binascii
import re

__all__ = ["PayloadError", "decode_image_payload"]

_BASE64 = re.compile(rb"[A-Za-z0-9+/\r\n]+={0,2}[\r\n]*")
_DATA_URL = re.compile(rb"data:[\w.+-]*/?[\w.+-]*(?:;[\w=.+-]+)*;base64,", re.IGNORECASE)


class PayloadError(ValueError):
    """The request's image payload is empty, too large or not valid base64; the message says which."""


def decode_image_payload(payload: bytes, *, max_bytes: int | None = None) -> bytes:
    """Return the encoded image in ``payload`` (raw bytes, base64 text or a base64 data URL).

    Raises :class:`PayloadError` when the payload is empty, when the image is larger than ``max_bytes`` or when
    base64 text does not decode.
    """
    if isinstance(payload, str):
        payload = payload.encode()
    if not payload:
        raise PayloadError("empty image: the request's 'image' input has no bytes")
    if max_bytes is not None and len(payload) > max_bytes * 4 // 3 + 1024:
        raise PayloadError(f"image too large: {len(payload)} bytes, the limit is {max_bytes} bytes")
    data = payload
    match = _DATA_URL.match(payload)
    if match:
        data = _b64decode(payload[match.end() :])
    elif _BASE64.fullmatch(payload) and len(re.sub(rb"[\r\n]", b"", payload)) % 4 == 0:
        data = _b64decode(payload)
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadError(f"image too large: {len(data)} bytes, the limit is {max_bytes} bytes")
    if not data:
        raise PayloadError("empty image: the request's 'image' input has no bytes")
    return data


def _b64decode(text: bytes) -> bytes:
    text = re.sub(rb"\s+", b"", text)
    altchars = b"-_" if (b"-" in text or b"_" in text) else None
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError(f"image is neither an encoded image file nor valid base64 ({exc})") from None
