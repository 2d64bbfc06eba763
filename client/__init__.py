"""Thin Python client and CLI for the OFA captioning Triton server (gRPC or HTTP, over tritonclient).

    from client import CaptionClient
    print(CaptionClient("127.0.0.1:8001").caption("cat.jpg").text)

CLI: ``python -m client caption PATH... [--url] [--protocol] [--beam-size] [--max-length] [--num-captions]
[--json] [--retries N] [--deadline S] [-v] [--api-key] [--tls] [--ca-cert] [--client-cert --client-key]
[--allow-private-urls]`` and ``python -m client health``. The inference key defaults to ``$CAPTION_API_KEY`` (or
the file ``$CAPTION_API_KEY_FILE``). Transient failures are retried within a deadline per call
(``CaptionClient(retries=..., deadline=...)``, ``client.retry_count``). See docs/serving.md.
"""

from .api import (
    API_KEY_HEADER,
    GRPC_API_KEY_HEADER,
    AuthenticationError,
    Caption,
    CaptionClient,
    CaptionError,
    CaptionTimeoutError,
    ImageSourceError,
    InvalidInputError,
    ServerUnavailableError,
    api_key_headers,
    download_image,
    grpc_service_config,
    is_url,
    load_image_bytes,
    read_api_key,
    with_api_key,
)

__all__ = [
    "API_KEY_HEADER",
    "GRPC_API_KEY_HEADER",
    "AuthenticationError",
    "Caption",
    "CaptionClient",
    "CaptionError",
    "CaptionTimeoutError",
    "ImageSourceError",
    "InvalidInputError",
    "ServerUnavailableError",
    "api_key_headers",
    "download_image",
    "grpc_service_config",
    "is_url",
    "load_image_bytes",
    "read_api_key",
    "with_api_key",
]
