"""``CaptionClient``: caption images with the OFA Triton server over gRPC or HTTP (a thin layer on tritonclient).

    from client import CaptionClient

    with CaptionClient("127.0.0.1:8001") as c:                      # gRPC; "http://127.0.0.1:8000" for HTTP
        print(c.caption("cat.jpg"))                                 # Caption(text='...', score=-0.61)
        print(c.caption_n_best("cat.jpg", num_captions=3))          # [Caption(...), ...], best first
        for r in c.caption_many(["a.jpg", b"...", pil_image], concurrency=8):
            print(r)                                                # a Caption or a CaptionError, in order

Errors keep the server's message and come as typed exceptions: :class:`InvalidInputError` (the server said
INVALID_ARGUMENT: undecodable image, settings out of range), :class:`ServerUnavailableError` (nothing listens,
the model is not ready; retried with backoff, as it is safe to), :class:`CaptionTimeoutError`,
:class:`ImageSourceError` (the client could not read the file or download the URL), all :class:`CaptionError`.
"""

from __future__ import annotations

import contextlib
import io
import random
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Caption",
    "CaptionClient",
    "CaptionError",
    "CaptionTimeoutError",
    "ImageSourceError",
    "InvalidInputError",
    "ServerUnavailableError",
    "load_image_bytes",
    "download_image",
]

#: Largest image the client downloads from an http(s) URL.
MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}


@dataclass(frozen=True)
class Caption:
    """A caption and its beam-search score (higher is better)."""

    text: str
    score: float


class CaptionError(Exception):
    """Base of the client's errors; ``str()`` is the message (the server's, where it sent one)."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class InvalidInputError(CaptionError):
    """The server refused the request (INVALID_ARGUMENT / HTTP 400): bad image, settings out of range."""


class ServerUnavailableError(CaptionError):
    """The server cannot be reached or is not ready (UNAVAILABLE); retried with backoff before raising."""


class CaptionTimeoutError(CaptionError):
    """No answer within the client's timeout."""


class ImageSourceError(CaptionError):
    """The client could not read the image: missing file, failed download, unsupported object."""


def download_image(url: str, *, timeout: float = 30.0, max_bytes: int = MAX_DOWNLOAD_BYTES) -> bytes:
    """Bytes at an http(s) ``url`` (the client downloads; the server never fetches URLs)."""
    if not url.lower().startswith(("http://", "https://")):
        raise ImageSourceError(f"{url}: only http(s) URLs are downloaded")
    request = urllib.request.Request(url, headers={"User-Agent": "ofa-caption-client/0.1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ImageSourceError(f"{url}: download failed: {exc}") from exc
    if len(data) > max_bytes:
        raise ImageSourceError(f"{url}: larger than the download limit of {max_bytes} bytes")
    return data


def load_image_bytes(image: Any) -> bytes:
    """Encoded bytes of ``image``: a path (str or Path), an http(s) URL, bytes, or a PIL image (sent as PNG)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str) and image.lower().startswith(("http://", "https://")):
        return download_image(image)
    if isinstance(image, str | Path):
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise ImageSourceError(f"{image}: {exc.strerror or exc}") from exc
    if hasattr(image, "save") and hasattr(image, "mode"):  # PIL.Image.Image, without importing PIL
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise ImageSourceError(f"cannot send a {type(image).__name__}: pass a path, URL, bytes or a PIL image")


def _parse_url(url: str | None, protocol: str | None) -> tuple[str, str, bool]:
    """(protocol, host:port, ssl) from a URL such as ``host:port``, ``http://host:port``, ``grpc://host:port``."""
    scheme = ""
    if url and "://" in url:
        scheme, url = url.split("://", 1)
        scheme = scheme.lower()
    if protocol is None:
        protocol = "http" if scheme in ("http", "https") else "grpc"
    protocol = protocol.lower()
    if protocol not in DEFAULT_PORTS:
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    if scheme and scheme not in ("http", "https", "grpc", "grpcs"):
        raise ValueError(f"unsupported URL scheme {scheme!r}")
    address = (url or f"127.0.0.1:{DEFAULT_PORTS[protocol]}").rstrip("/")
    return protocol, address, scheme in ("https", "grpcs")


class CaptionClient:
    """Client of the ``caption`` model; thread-safe (one tritonclient connection per thread).

    Args:
        url: ``host:port`` (default 127.0.0.1:8001 for gRPC, :8000 for HTTP), or a URL whose scheme
            (``http://``, ``https://``, ``grpc://``) sets the protocol when ``protocol`` is not given.
        protocol: ``"grpc"`` or ``"http"`` (default: from the URL's scheme, else gRPC).
        model: the model to call (the ``caption`` ensemble).
        timeout: seconds to wait for one answer.
        retries: extra attempts after :class:`ServerUnavailableError`, with exponential backoff from ``backoff`` s.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str | None = None,
        *,
        model: str = "caption",
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self.protocol, self.address, self.ssl = _parse_url(url, protocol)
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()

    # -- connections -----------------------------------------------------------------------------------
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                import tritonclient.grpc as tc

                client = tc.InferenceServerClient(self.address, ssl=self.ssl)
            else:
                import tritonclient.http as tc

                client = tc.InferenceServerClient(
                    self.address, ssl=self.ssl, connection_timeout=self.timeout, network_timeout=self.timeout
                )
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        return tc

    def close(self) -> None:
        """Close every connection this client opened."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):  # closing is best effort
                client.close()
        self._local = threading.local()

    def __enter__(self) -> CaptionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls -----------------------------------------------------------------------------------------
    def _call(self, fn, *args, **kwargs):
        """``fn(client, ...)`` with errors mapped to CaptionError; UNAVAILABLE is retried with backoff."""
        for attempt in range(self.retries + 1):
            try:
                return fn(self._client(), *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - mapped below
                error = _map_error(exc)
                if not isinstance(error, ServerUnavailableError) or attempt == self.retries:
                    raise error from exc
                self._drop_connection()
                time.sleep(self.backoff * (2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _drop_connection(self) -> None:
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                client.close()

    def caption(self, image: Any, beam_size: int | None = None, max_length: int | None = None) -> Caption:
        """Caption one image (path, http(s) URL, bytes or PIL image); ``None`` settings = the server's defaults."""
        result = self._infer(image, {"beam_size": beam_size, "max_length": max_length}, ("caption", "score"))
        return Caption(
            text=_text(result.as_numpy("caption")[0, 0]), score=float(result.as_numpy("score")[0, 0])
        )

    def caption_n_best(
        self,
        image: Any,
        num_captions: int | None = None,
        beam_size: int | None = None,
        max_length: int | None = None,
    ) -> list[Caption]:
        """The ``num_captions`` best captions of one image, best first (1..beam_size; ``None`` = the checkpoint's
        ``num_return_sequences``). An entry with an empty text and a score of ``-inf`` stands for a hypothesis
        the engine could not produce (only after non-finite scores)."""
        settings = {"beam_size": beam_size, "max_length": max_length, "num_captions": num_captions}
        result = self._infer(image, settings, ("captions", "scores"))
        texts, scores = result.as_numpy("captions")[0], result.as_numpy("scores")[0]
        return [Caption(text=_text(t), score=float(s)) for t, s in zip(texts, scores, strict=True)]

    def _infer(self, image: Any, settings: dict[str, int | None], output_names: tuple[str, ...]) -> Any:
        """One request for one image with the INT32 ``settings`` that are not ``None``; the tritonclient result."""
        data = load_image_bytes(image)
        tc = self._module()
        inputs = [tc.InferInput("image", [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([[data]], dtype=np.object_))
        for name, value in settings.items():
            if value is not None:
                tensor = tc.InferInput(name, [1, 1], "INT32")
                tensor.set_data_from_numpy(np.array([[int(value)]], dtype=np.int32))
                inputs.append(tensor)
        outputs = [tc.InferRequestedOutput(name) for name in output_names]

        def infer(client):
            if self.protocol == "grpc":
                return client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout)
            return client.infer(self.model, inputs, outputs=outputs)

        return self._call(infer)

    def _caption_or_error(
        self, image: Any, beam_size: int | None, max_length: int | None, num_captions: int | None = None
    ):
        if isinstance(image, CaptionError):  # an item that already failed (e.g. a missing file) stays failed
            return image
        try:
            if num_captions is not None:
                return self.caption_n_best(image, num_captions, beam_size=beam_size, max_length=max_length)
            return self.caption(image, beam_size=beam_size, max_length=max_length)
        except CaptionError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - per-item error, the batch goes on
            return CaptionError(f"{type(exc).__name__}: {exc}")

    def imap(
        self,
        images: Iterable[Any],
        concurrency: int = 8,
        beam_size: int | None = None,
        max_length: int | None = None,
        num_captions: int | None = None,
    ) -> Iterator[Caption | list[Caption] | CaptionError]:
        """Like :meth:`caption_many`, yielding each result (in input order) as soon as it and those before it are done."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="caption") as pool:
            pending: deque = deque()
            for image in images:
                pending.append(
                    pool.submit(self._caption_or_error, image, beam_size, max_length, num_captions)
                )
                if len(pending) >= 2 * concurrency:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def caption_many(
        self,
        images: Iterable[Any],
        concurrency: int = 8,
        beam_size: int | None = None,
        max_length: int | None = None,
        num_captions: int | None = None,
    ) -> list[Caption | list[Caption] | CaptionError]:
        """Caption many images keeping ``concurrency`` requests in flight.

        Returns one entry per image, in input order: its :class:`Caption` (with ``num_captions``: its list of
        captions, as :meth:`caption_n_best`), or the :class:`CaptionError` it got (one bad image does not stop
        the others). A :class:`CaptionError` given as an image is passed through as that item's result.
        """
        return list(
            self.imap(
                images,
                concurrency=concurrency,
                beam_size=beam_size,
                max_length=max_length,
                num_captions=num_captions,
            )
        )

    def health(self, models: Iterable[str] = ("caption", "preprocess", "ofa")) -> dict[str, bool]:
        """``{"live": ..., "ready": ..., "model:<name>": ...}``; an unreachable server is all False (no retries)."""
        report = {"live": False, "ready": False}
        report.update({f"model:{m}": False for m in models})
        try:
            client = self._client()
            report["live"] = bool(client.is_server_live())
            report["ready"] = bool(client.is_server_ready())
            for m in models:
                report[f"model:{m}"] = bool(client.is_model_ready(m))
        except Exception:  # noqa: BLE001 - unreachable: the report says so
            self._drop_connection()
        return report


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _map_error(exc: BaseException) -> CaptionError:
    """The typed error for a tritonclient / network exception (keeps the server's message)."""
    if isinstance(exc, CaptionError):
        return exc
    try:
        from tritonclient.utils import InferenceServerException
    except ImportError:  # pragma: no cover
        InferenceServerException = ()  # type: ignore[assignment]  # noqa: N806
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        message = exc.message() or str(exc)
        if status in ("StatusCode.INVALID_ARGUMENT", "400"):
            return InvalidInputError(message, status)
        if status in ("StatusCode.UNAVAILABLE", "503"):
            return ServerUnavailableError(message, status)
        if status == "StatusCode.DEADLINE_EXCEEDED" or "timed out" in message.lower():
            return CaptionTimeoutError(message, status)
        if not status and any(s in message.lower() for s in ("connection refused", "failed to connect")):
            return ServerUnavailableError(message, status)
        return CaptionError(message, status or None)
    if isinstance(exc, TimeoutError) or type(exc).__name__ in ("timeout", "Timeout"):
        return CaptionTimeoutError(f"no answer in time: {exc}")
    if isinstance(exc, ConnectionError | OSError):
        return ServerUnavailableError(f"cannot reach the server: {exc}")
    return CaptionError(f"{type(exc).__name__}: {exc}")
