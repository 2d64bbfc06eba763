"""Image payloads as they arrive on the wire, before the engine decodes them.

The ``image`` input of the ``caption`` ensemble is a BYTES tensor. tritonclient and the binary-data extension
of the HTTP protocol carry the encoded file as is. A plain KServe v2 JSON request cannot carry arbitrary
bytes in a JSON string, so base64 text (optionally as a ``data:image/...;base64,`` URL) is accepted too.
Binary image formats always contain bytes outside the base64 alphabet, so the two cannot be confused.
"""

from __future__ import annotations

import base64
import binascii
import re

__all__ = ["PayloadError", "decode_image_payload"]

_BASE64 = re.compile(rb"[A-Za-z0-9+/=_\-\s]+")
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
    elif _BASE64.fullmatch(payload):
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
