"""Thin Python client and CLI for the OFA captioning Triton server (gRPC or HTTP, over tritonclient).

    from client import CaptionClient
    print(CaptionClient("127.0.0.1:8001").caption("cat.jpg").text)

CLI: ``python -m client caption PATH... [--url] [--protocol] [--beam-size] [--max-length] [--num-captions]
[--json]`` and
``python -m client health``. See docs/serving.md.
"""

from .api import (
    Caption,
    CaptionClient,
    CaptionError,
    CaptionTimeoutError,
    ImageSourceError,
    InvalidInputError,
    ServerUnavailableError,
    download_image,
    load_image_bytes,
)

__all__ = [
    "Caption",
    "CaptionClient",
    "CaptionError",
    "CaptionTimeoutError",
    "ImageSourceError",
    "InvalidInputError",
    "ServerUnavailableError",
    "download_image",
    "load_image_bytes",
]
