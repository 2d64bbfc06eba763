"""``CaptionClient``: caption images with the OFA Triton server over gRPC or HTTP (a thin layer on tritonclient).

    from client import CaptionClient

    with CaptionClient("127.0.0.1:8001") as c:                      # gRPC; "http://127.0.0.1:8000" for HTTP
        print(c.caption("cat.jpg"))                                 # Caption(text='...', score=-0.61)
        print(c.caption_n_best("cat.jpg", num_captions=3))          # [Caption(...), ...], best first
        for r in c.caption_many(["a.jpg", b"...", pil_image], concurrency=8):
            print(r)                                                # a Caption or a CaptionError, in order

Errors keep the server's message and come as typed exceptions: :class:`InvalidInputError` (the server said
INVALID_ARGUMENT: undecodable image, settings out of range; never retried), :class:`ServerUnavailableError`
(transient: nothing listens, the server is stopping or its queue is full, the model is being reloaded, a backend
process died under the request), :class:`CaptionTimeoutError`, :class:`AuthenticationError` (no or a wrong API
key; never retried), :class:`ImageSourceError` (the client could not read the file or download the URL), all
:class:`CaptionError`.

Retries: a caption request is idempotent (same image and settings, same answer), so a transient failure
(``error.transient``; what Triton 2.51 answers in each case is listed in docs/serving.md) is sent again, up to
``retries`` times, after a wait drawn uniformly from
``[0, min(max_backoff, backoff * 2**n))`` (exponential backoff with full jitter), on a new connection, and never
past ``deadline`` seconds from the start of the call (each attempt's timeout is cut to the time left). Every retry
is counted in :attr:`CaptionClient.retry_count` and logged at DEBUG on the ``client`` logger (the record carries
``retry_error``, ``retry_status`` and ``retry_message``: the error's type name, status and message, for tools that
count causes).

Security: the inference key (``api_key``, else ``$CAPTION_API_KEY``, else the file ``$CAPTION_API_KEY_FILE``)
goes in a request header on every call (``ofa-api-key`` over HTTP, ``triton-grpc-protocol-ofa-api-key`` over
gRPC) and never into a repr, a log line or an error message. ``tls=True`` (or an ``https://`` / ``grpcs://``
URL) encrypts the connection; without it the key crosses the network in clear text. Image URLs are downloaded
by the client (see :func:`download_image`): http(s) only, within a total deadline, and never from loopback,
private, link-local or other non-public addresses unless ``allow_private_urls=True``.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import ipaddress
import json
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:  # tritonclient's request-header hook (an abc-only module, cheap to import)
    from tritonclient._plugin import InferenceServerClientPlugin as _PluginBase
except ImportError:  # pragma: no cover - tritonclient is a dependency; the plugin also works duck-typed
    _PluginBase = object  # type: ignore[assignment,misc]

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

#: Largest image the client downloads from an http(s) URL.
MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024
#: Seconds for a whole download (name lookup, connection, redirects, headers and body together).
DOWNLOAD_TIMEOUT = 30.0
#: Redirects followed per download; each one is checked like the first URL.
MAX_REDIRECTS = 5
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}

#: Default extra attempts after a transient failure: enough that the deadline, not the count, ends the retrying.
DEFAULT_RETRIES = 50
#: Default total seconds of one call, all attempts and waits included (the longer of this and ``timeout``): rides
#: out a supervisor heal (about 5 s) and a tritonserver restart (10-40 s measured, warm-up included).
DEFAULT_DEADLINE = 60.0
#: Default longest wait between two attempts (the cap of the exponential backoff).
MAX_BACKOFF = 2.0
#: Attempts gRPC itself makes per client attempt when ``grpc_retry_policy=True`` (its service config).
GRPC_POLICY_ATTEMPTS = 3

_log = logging.getLogger("client")
# The retry loop's clock and sleep (tests replace them).
_clock = time.monotonic
_sleep = time.sleep

#: HTTP header that carries the inference key (the server's ``OFA_API_KEY``).
API_KEY_HEADER = "ofa-api-key"
#: The same key over gRPC: Triton's restricted protocols read metadata ``triton-grpc-protocol-<header>``.
GRPC_API_KEY_HEADER = "triton-grpc-protocol-" + API_KEY_HEADER
#: Environment variables the key comes from when the caller passes none (the value, or a file holding it).
API_KEY_ENV = "CAPTION_API_KEY"
API_KEY_FILE_ENV = "CAPTION_API_KEY_FILE"


@dataclass(frozen=True)
class Caption:
    """A caption and its beam-search score (higher is better)."""

    text: str
    score: float


class CaptionError(Exception):
    """Base of the client's errors; ``str()`` is the message (the server's, where it sent one).

    ``status`` is the server's status (``"StatusCode.INTERNAL"``, ``"500"``...) where there was one; ``transient``
    says whether sending the same request again may succeed (the client retries those); ``retries`` is how many
    retries the call made before it gave up with this error.
    """

    #: True when the key was cut out of the message (and the original exception is not chained).
    redacted = False
    #: Whether errors of this type are worth a retry (an instance may say otherwise).
    transient = False

    def __init__(self, message: str, status: str | None = None, *, transient: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        if transient is not None:
            self.transient = transient
        self.retries = 0


class InvalidInputError(CaptionError):
    """The server refused the request (INVALID_ARGUMENT / HTTP 400): bad image, settings out of range."""


class ServerUnavailableError(CaptionError):
    """The server could not answer for now: it cannot be reached (connection refused, reset or closed), says
    UNAVAILABLE / HTTP 503 (stopping, queue full) or 502 (a proxy in front of it), the model is being (re)loaded,
    or a backend process died under the request. Transient, so retried with backoff within the deadline before it
    is raised (except a TLS handshake failure: same type, ``transient`` False)."""

    transient = True


class CaptionTimeoutError(CaptionError):
    """No answer within the client's timeout."""


class ImageSourceError(CaptionError):
    """The client could not read the image: missing file, failed or refused download, unsupported object."""


class AuthenticationError(CaptionError):
    """The server refused the request for want of a valid key (HTTP 401/403, gRPC UNAUTHENTICATED or
    PERMISSION_DENIED, or Triton's "restricted" answer, which its gRPC server sends as UNAVAILABLE); never
    retried. The message says whether a key was sent, never the key."""


# -- image sources -----------------------------------------------------------------------------------------

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 64 * 1024


def is_url(source: object) -> bool:
    """Whether ``source`` is a URL rather than a local path: a ``str`` that starts with ``scheme://``.

    No guessing beyond that: ``"http://h/x.jpg"`` and ``"file:///etc/passwd"`` are URLs (only http(s) ones are
    downloaded, the others refused), ``"cat.jpg"`` and ``"/data/cat.jpg"`` are paths, and a :class:`pathlib.Path`
    is always a path (pass one for a file whose name looks like a URL).
    """
    return isinstance(source, str) and bool(_SCHEME.match(source))


class _TooLarge(Exception):
    """The image is over the download limit."""


class _Refused(Exception):
    """The URL leads to an address the caller did not allow."""


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a download may not connect to ``ip`` ("loopback", "private", ...), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour  # ::ffff:a.b.c.d and 2002:AABB:CCDD:: carry an IPv4 address
        if embedded is not None:
            return _refusal(embedded)
        if ip.is_site_local:
            return "site-local"
    for label in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{label}"):
            return label.replace("_", "-")
    if not ip.is_global:  # shared address space (100.64/10) and the other special-purpose ranges
        return "non-public"
    return None


def _resolve(host: str, port: int, deadline: float) -> list[tuple[Any, ...]]:
    """``getaddrinfo`` results for ``host`` (TCP), within the deadline (the lookup runs in a daemon thread)."""
    box: dict[str, Any] = {}

    def lookup() -> None:
        try:
            box["result"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            box["error"] = exc

    thread = threading.Thread(target=lookup, name="download-resolve", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise TimeoutError(f"looking up {host} took too long")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _checked_addresses(host: str, port: int, deadline: float, allow_private: bool) -> list[tuple[Any, ...]]:
    """Every address ``host`` resolves to, each checked; a single refused one refuses the host."""
    infos = _resolve(host, port, deadline)
    if not infos:
        raise OSError(f"{host} has no address")
    if not allow_private:
        for info in infos:
            # An IPv6 scope ("fe80::1%eth0") is not part of the address.
            ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            reason = _refusal(ip)
            if reason is not None:
                what = f"{host} is" if host == str(ip) else f"{host} resolves to {ip},"
                raise _Refused(
                    f"{what} a {reason} address (pass allow_private_urls=True, or --allow-private-urls on "
                    "the command line, to download from such hosts)"
                )
    return infos


class _Watchdog:
    """Shuts a socket down at the download's deadline, which ends any read or write blocked on it."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.fired = False
        self._fd = sock.fileno()
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            self.fired = True
            # A duplicate of the descriptor: shutting it down ends the connection for the original too.
            # (Not connected yet: shutdown fails and the connect timeout ends the wait instead.)
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(self._fd)) as dup:
                dup.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Disarm (before the socket is closed, so that the descriptor is never reused under the timer)."""
        self._timer.cancel()
        with self._lock:
            self._fd = -1


def _connect(infos: list[tuple[Any, ...]], deadline: float) -> socket.socket:
    """A TCP connection to the first of the checked addresses that answers (no second name lookup)."""
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError("no address to connect to")


def _fetch(
    url: str, deadline: float, max_bytes: int, allow_private: bool
) -> tuple[int, str, str | None, bytes]:
    """One GET of ``url`` (already checked for its scheme): (status, reason, Location, body)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in image URLs are not supported")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    try:
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"bad host name {parts.hostname!r}") from exc
    port = parts.port or (443 if scheme == "https" else 80)  # .port raises ValueError for a bad port
    infos = _checked_addresses(host, port, deadline, allow_private)
    sock = _connect(infos, deadline)
    watchdog = _Watchdog(sock, deadline)
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        if scheme == "https":
            context = ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=host)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, context=context)
        else:
            conn = http.client.HTTPConnection(host, port)
        conn.sock = sock  # the checked, connected address: http.client never looks the name up itself
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        conn.request(
            "GET",
            path,
            headers={
                "User-Agent": "ofa-caption-client/0.1",
                "Accept-Encoding": "identity",
                "Connection": "close",
            },
        )
        response = conn.getresponse()
        location = response.getheader("Location")
        if response.status in _REDIRECTS or not 200 <= response.status < 300:
            return response.status, response.reason, location, b""
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise _TooLarge()
        chunks, size = [], 0
        while size <= max_bytes:
            if time.monotonic() >= deadline:
                raise TimeoutError
            chunk = response.read1(_READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if watchdog.fired:
            raise TimeoutError
        if size > max_bytes:
            raise _TooLarge()
        if response.length:  # the server promised more than it sent
            raise OSError("the connection closed before the whole image arrived")
        return response.status, response.reason, location, b"".join(chunks)
    except (OSError, http.client.HTTPException) as exc:
        if watchdog.fired or time.monotonic() >= deadline:
            raise TimeoutError from exc
        raise
    finally:
        watchdog.stop()
        sock.close()


def download_image(
    url: str,
    *,
    timeout: float = DOWNLOAD_TIMEOUT,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    allow_private: bool = False,
    max_redirects: int = MAX_REDIRECTS,
) -> bytes:
    """Bytes at an http(s) ``url`` (the client downloads; the server never fetches URLs).

    Guards against a URL that points the client at what it should not fetch, and against a server that never
    finishes:

    * only ``http`` and ``https``, for the URL and for every redirect (``Location``) it leads to; at most
      ``max_redirects`` redirects;
    * ``timeout`` seconds for the whole download (name lookup, connection, TLS, redirects, headers and body),
      not per read: a server that trickles bytes fails at the deadline;
    * unless ``allow_private``: a host that resolves to a loopback, private, link-local (169.254/16, fe80::/10),
      unspecified, multicast, reserved or other non-public address is refused. Every address the name resolves
      to is checked, and the connection goes to a checked address (the name is not looked up again, so it
      cannot be switched between check and connection); this applies to each redirect too;
    * at most ``max_bytes`` bytes. Credentials in the URL are refused; proxies (``$http_proxy``...) are not
      used, as the address check needs the direct connection.

    Every failure raises :class:`ImageSourceError` naming the URL.
    """
    if not url.lower().startswith(("http://", "https://")):
        raise ImageSourceError(f"{url}: only http(s) URLs are downloaded (pass a local file as a path)")
    deadline = time.monotonic() + timeout
    current = url
    for _ in range(max_redirects + 1):
        try:
            status, reason, location, data = _fetch(current, deadline, max_bytes, allow_private)
        except TimeoutError as exc:
            raise ImageSourceError(f"{url}: not downloaded within {timeout:g} s") from exc
        except _TooLarge:
            raise ImageSourceError(f"{url}: larger than the download limit of {max_bytes} bytes") from None
        except _Refused as exc:
            where = "" if current == url else f" (redirected to {current})"
            raise ImageSourceError(f"{url}: refused{where}: {exc}") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise ImageSourceError(f"{url}: download failed: {exc}") from exc
        if status not in _REDIRECTS:
            if not 200 <= status < 300:
                raise ImageSourceError(f"{url}: download failed: HTTP {status} {reason}")
            return data
        if not location:
            raise ImageSourceError(f"{url}: download failed: HTTP {status} without a Location")
        target = urllib.parse.urljoin(current, location.strip())
        if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
            raise ImageSourceError(
                f"{url}: refused: redirected to {target}: only http(s) URLs are downloaded"
            )
        current = target
    raise ImageSourceError(f"{url}: refused: more than {max_redirects} redirects")


def load_image_bytes(
    image: Any, *, allow_private_urls: bool = False, download_timeout: float = DOWNLOAD_TIMEOUT
) -> bytes:
    """Encoded bytes of ``image``: a local path (``str`` or ``Path``), an http(s) URL (a ``str`` with a scheme,
    see :func:`is_url`; downloaded by :func:`download_image`), bytes, or a PIL image (sent as PNG)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if is_url(image):
        return download_image(image, timeout=download_timeout, allow_private=allow_private_urls)
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


# -- the inference key -------------------------------------------------------------------------------------


class _Secret:
    """A key that shows as ``<hidden>`` in every repr (a client's ``vars()``, a plugin, a traceback's locals)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<hidden>"

    __str__ = __repr__


def _valid_key(value: str, source: str) -> str:
    if not value or any(not (" " <= ch <= "~") for ch in value):
        # The message names where the key came from, never the key.
        raise ValueError(f"the API key from {source} must be non-empty printable ASCII (no newlines)")
    return value


def read_api_key(api_key: str | None = None) -> str | None:
    """The inference key: ``api_key`` when given, else ``$CAPTION_API_KEY``, else the contents of the file
    ``$CAPTION_API_KEY_FILE`` (surrounding whitespace dropped); None when there is none. Setting both variables
    is an error, and so is an unreadable or empty file. Errors never contain the key."""
    if api_key is not None:
        return _valid_key(api_key, "api_key") if api_key else None
    value, path = os.environ.get(API_KEY_ENV) or None, os.environ.get(API_KEY_FILE_ENV) or None
    if value is not None and path is not None:
        raise ValueError(f"set {API_KEY_ENV} or {API_KEY_FILE_ENV}, not both")
    if value is not None:
        return _valid_key(value, API_KEY_ENV)
    if path is not None:
        try:
            text = Path(path).read_text(encoding="ascii", errors="replace").strip()
        except OSError as exc:
            raise ValueError(f"{API_KEY_FILE_ENV}={path}: {exc.strerror or exc}") from None
        return _valid_key(text, f"{API_KEY_FILE_ENV}={path}")
    return None


def api_key_headers(protocol: str, api_key: str | None = None) -> dict[str, str]:
    """The request header(s) carrying the inference key for ``protocol`` ("grpc" or "http"), for tools that call
    tritonclient directly (``headers=`` of ``infer``); the key as in :func:`read_api_key`, ``{}`` without one."""
    key = read_api_key(api_key)
    if key is None:
        return {}
    return {_key_header(protocol): key}


def _key_header(protocol: str) -> str:
    """The name of the header (gRPC metadata) that carries the inference key for ``protocol``."""
    return GRPC_API_KEY_HEADER if protocol == "grpc" else API_KEY_HEADER


class _HeadersPlugin(_PluginBase):
    """tritonclient client plugin that adds fixed headers (gRPC metadata) to every request of a client."""

    def __init__(self, name: str, secret: _Secret) -> None:
        self._name = name
        self._secret = secret

    def __call__(self, request: Any) -> None:
        request.headers[self._name] = self._secret.reveal()

    def __repr__(self) -> str:
        return f"<header {self._name}: <hidden>>"


def with_api_key(client: Any, protocol: str, api_key: str | None = None) -> Any:
    """``client`` (a ``tritonclient.grpc`` or ``tritonclient.http`` ``InferenceServerClient``) with the inference
    key, read as in :func:`read_api_key`, registered as a client plugin: every request it sends then carries the
    key's header for ``protocol`` ("grpc" or "http"). Without a key the client is returned unchanged. For tools
    that call tritonclient directly; :class:`CaptionClient` does this itself."""
    key = read_api_key(api_key)
    if key is not None:
        client.register_plugin(_HeadersPlugin(_key_header(protocol), _Secret(key)))
    return client


def _url_scheme(url: str | None) -> str:
    return url.split("://", 1)[0].lower() if url and "://" in url else ""


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
            (``http://``, ``https://``, ``grpc://``, ``grpcs://``) sets the protocol when ``protocol`` is not given;
            ``https://`` and ``grpcs://`` mean TLS.
        protocol: ``"grpc"`` or ``"http"`` (default: from the URL's scheme, else gRPC).
        model: the model to call (the ``caption`` ensemble).
        timeout: seconds to wait for one answer (one attempt; cut to what is left of ``deadline``).
        retries: most extra attempts of one call after a transient failure (:class:`ServerUnavailableError`:
            connection refused, reset or closed, gRPC UNAVAILABLE, HTTP 503, the model being reloaded, a backend
            stub that died under the request); ``0`` turns retrying off, gRPC's own included. Never retried:
            invalid input, authentication, timeouts, other server errors.
        backoff: the first wait's upper bound in seconds; the n-th wait is drawn uniformly from
            ``[0, min(max_backoff, backoff * 2**n))`` (full jitter, so that clients refused together do not come
            back together).
        deadline: total seconds one call may take, all attempts and waits included (each attempt's ``timeout`` is
            cut to the time left, and no wait outlasts it); default: the longer of :data:`DEFAULT_DEADLINE` (60 s)
            and ``timeout``, which rides out a supervisor heal and a tritonserver restart.
        max_backoff: the longest single wait (default :data:`MAX_BACKOFF`).
        grpc_retry_policy: also give the gRPC channel a retry policy (a service config in tritonclient's
            ``channel_args``) that makes gRPC itself resend a request answered UNAVAILABLE, up to
            :data:`GRPC_POLICY_ATTEMPTS` times within the attempt's timeout, before this client's own loop sees
            the failure. Off by default, as Triton refuses a missing or wrong key with UNAVAILABLE too and gRPC
            cannot tell the two apart (it would resend refused keys); gRPC's retries are not counted in
            :attr:`retry_count`. What it never covers, so the client's loop still does: other statuses (a dead
            stub's INTERNAL, a reload's NOT_FOUND), a failure after the response started, and HTTP.
        api_key: the inference key, sent with every request (header ``ofa-api-key`` over HTTP, metadata
            ``triton-grpc-protocol-ofa-api-key`` over gRPC); default ``$CAPTION_API_KEY``, else the contents of
            the file ``$CAPTION_API_KEY_FILE``; none when neither is set (``""`` sends none either).
        tls: encrypt the connection (gRPC over TLS; for HTTP the same as an ``https://`` URL, for a TLS
            terminator in front of the server). Contradicts a plain ``http://`` or ``grpc://`` URL.
        ca_cert: PEM file of the CA that signed the server's certificate (default: the system's CAs).
        client_cert, client_key: PEM certificate chain and private key for mutual TLS (both or neither).
        allow_private_urls: let image URLs lead to loopback, private, link-local... hosts
            (see :func:`download_image`); off by default.
        download_timeout: seconds for the whole download of an image URL.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str | None = None,
        *,
        model: str = "caption",
        timeout: float = 120.0,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.5,
        deadline: float | None = None,
        max_backoff: float = MAX_BACKOFF,
        grpc_retry_policy: bool = False,
        api_key: str | None = None,
        tls: bool = False,
        ca_cert: str | os.PathLike[str] | None = None,
        client_cert: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        allow_private_urls: bool = False,
        download_timeout: float = DOWNLOAD_TIMEOUT,
    ) -> None:
        self.protocol, self.address, url_tls = _parse_url(url, protocol)
        if tls and not url_tls and _url_scheme(url) in ("http", "grpc"):
            raise ValueError(
                f"tls=True contradicts the plain {_url_scheme(url)}:// URL; use https:// or grpcs://"
            )
        self.ssl = bool(tls or url_tls)
        files = {"ca_cert": ca_cert, "client_cert": client_cert, "client_key": client_key}
        if any(files.values()) and not self.ssl:
            raise ValueError(
                "ca_cert, client_cert and client_key are TLS settings: add tls=True (--tls) or use an https:// "
                "or grpcs:// URL"
            )
        if bool(client_cert) != bool(client_key):
            raise ValueError("client_cert and client_key go together (mutual TLS needs both)")
        for name, path in files.items():
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"{name} {os.fspath(path)}: no such readable file")
        self.ca_cert, self.client_cert, self.client_key = (
            os.fspath(p) if p else None for p in (ca_cert, client_cert, client_key)
        )
        key = read_api_key(api_key)
        self._api_key = _Secret(key) if key is not None else None
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must not be negative")
        if timeout <= 0 or (deadline is not None and deadline <= 0):
            raise ValueError("timeout and deadline must be positive")
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        #: Total seconds one call may take, all attempts and waits included.
        self.deadline = float(deadline) if deadline is not None else max(DEFAULT_DEADLINE, timeout)
        self.grpc_retry_policy = grpc_retry_policy
        self._retry_count = 0
        self.allow_private_urls = allow_private_urls
        self.download_timeout = download_timeout
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()

    @property
    def retry_count(self) -> int:
        """Retries this client has made since it was created (all threads; gRPC's own retries not included)."""
        with self._lock:
            return self._retry_count

    @property
    def has_api_key(self) -> bool:
        """Whether requests carry an inference key (the key itself is not readable from the client)."""
        return self._api_key is not None

    def __repr__(self) -> str:
        key = "set" if self._api_key is not None else "none"
        where = f"{self.protocol}{'s' if self.ssl else ''}://{self.address}"  # grpc(s):// or http(s)://
        return f"CaptionClient({where!r}, model={self.model!r}, api_key={key})"

    # -- connections -----------------------------------------------------------------------------------
    def grpc_channel_args(self) -> list[tuple[str, Any]]:
        """The gRPC channel arguments this client passes to tritonclient (``channel_args`` replaces tritonclient's
        own, so its defaults are repeated here): message sizes and keepalive as tritonclient sets them, fast
        reconnects (a channel is also replaced after a failure), retries off with ``retries=0`` (gRPC's
        transparent retries of requests that never reached the server included), and with
        ``grpc_retry_policy`` a service config whose retry policy resends UNAVAILABLE."""
        import tritonclient.grpc as tc

        keepalive = tc.KeepAliveOptions()
        args: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", tc.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", tc.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            # (not grpc.min_reconnect_backoff_ms: it is also the connect timeout, 20 s by default)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(max(self.max_backoff, 0.1) * 1000)),
            ("grpc.enable_retries", 1 if self.retries > 0 else 0),
        ]
        if self.grpc_retry_policy and self.retries > 0:
            args.append(
                (
                    "grpc.service_config",
                    json.dumps(grpc_service_config(min(GRPC_POLICY_ATTEMPTS, self.retries + 1))),
                )
            )
        return args

    def _client(self) -> Any:
        """This thread's tritonclient client. An HTTP client's socket timeouts are fixed when it is made, so one
        made for a longer timeout than the current attempt may take (or a much shorter one) is replaced."""
        client = getattr(self._local, "client", None)
        timeout = getattr(self._local, "attempt_timeout", None) or self.timeout
        if client is not None and self.protocol == "http":
            made_for = getattr(self._local, "timeout", timeout)
            if made_for > timeout + 0.05 or made_for < timeout - 1.0:
                self._drop_connection()
                client = None
        if client is None:
            if self.protocol == "grpc":
                import tritonclient.grpc as tc

                client = tc.InferenceServerClient(
                    self.address,
                    ssl=self.ssl,
                    root_certificates=self.ca_cert,
                    private_key=self.client_key,
                    certificate_chain=self.client_cert,
                    channel_args=self.grpc_channel_args(),
                )
            else:
                import tritonclient.http as tc

                options = {"ca_certs": self.ca_cert, "certfile": self.client_cert, "keyfile": self.client_key}
                options = {k: v for k, v in options.items() if v}
                client = tc.InferenceServerClient(
                    self.address,
                    ssl=self.ssl,
                    ssl_options=options or None,
                    connection_timeout=timeout,
                    network_timeout=timeout,
                )
            if self._api_key is not None:
                client.register_plugin(_HeadersPlugin(_key_header(self.protocol), self._api_key))
            self._local.client = client
            self._local.timeout = timeout
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
    def _call(self, fn):
        """``fn(client, timeout)`` with errors mapped to CaptionError; transient ones are retried (see the
        module's docstring) until ``retries`` or the deadline runs out. ``timeout`` is the attempt's own:
        ``self.timeout`` cut to what is left of the deadline."""
        start = _clock()
        end = start + self.deadline
        retries = 0
        while True:
            attempt_timeout = max(0.001, min(self.timeout, end - _clock()))
            try:
                self._local.attempt_timeout = attempt_timeout
                return fn(self._client(), attempt_timeout)
            except Exception as exc:  # noqa: BLE001 - mapped below
                error = self._error(exc)
                cause = None if error.redacted else exc  # chained unless the key had to be cut out
                if not error.transient or retries >= self.retries:
                    raise _gave_up(error, retries, _clock() - start) from cause
                wait = random.uniform(0.0, min(self.max_backoff, self.backoff * 2**retries))
                if _clock() + wait >= end:  # no time left for another attempt
                    raise _gave_up(error, retries, _clock() - start) from cause
                # A new connection: a gRPC channel that saw the server go away backs off its reconnects, and
                # behind a load balancer a new connection may reach another replica.
                self._drop_connection()
                retries += 1
                with self._lock:
                    self._retry_count += 1
                _log.debug(
                    "retry %d of at most %d in %.2f s (%s://%s, model %s): %s: %s",
                    retries,
                    self.retries,
                    wait,
                    self.protocol,
                    self.address,
                    self.model,
                    type(error).__name__,
                    error.message,
                    extra={
                        "retry_error": type(error).__name__,
                        "retry_status": error.status,
                        "retry_message": error.message,
                    },
                )
                _sleep(wait)

    def _error(self, exc: BaseException) -> CaptionError:
        """:func:`_map_error`, saying whether a key was sent when the server wants one, and never showing the key."""
        error = _map_error(exc)
        if isinstance(error, AuthenticationError):
            hint = (
                "the API key sent was refused"
                if self._api_key is not None
                else f"no API key was sent: pass api_key= (--api-key), or set {API_KEY_ENV} or {API_KEY_FILE_ENV}"
            )
            error = AuthenticationError(f"{error.message} ({hint})", error.status)
        if self._api_key is not None and self._api_key.reveal() in error.message:
            error = type(error)(
                error.message.replace(self._api_key.reveal(), "<hidden>"),
                error.status,
                transient=error.transient,
            )
            error.redacted = True
        return error

    def _drop_connection(self) -> None:
        client = getattr(self._local, "client", None)
        self._local.client = None
        self._local.timeout = None
        if client is not None:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                client.close()

    def caption(self, image: Any, beam_size: int | None = None, max_length: int | None = None) -> Caption:
        """Caption one image (a path, an http(s) URL, bytes or a PIL image: see :func:`load_image_bytes`);
        ``None`` settings = the server's defaults."""
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
        data = load_image_bytes(
            image, allow_private_urls=self.allow_private_urls, download_timeout=self.download_timeout
        )
        tc = self._module()
        inputs = [tc.InferInput("image", [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([[data]], dtype=np.object_))
        for name, value in settings.items():
            if value is not None:
                tensor = tc.InferInput(name, [1, 1], "INT32")
                tensor.set_data_from_numpy(np.array([[int(value)]], dtype=np.int32))
                inputs.append(tensor)
        outputs = [tc.InferRequestedOutput(name) for name in output_names]

        def infer(client, timeout):
            if self.protocol == "grpc":
                return client.infer(self.model, inputs, outputs=outputs, client_timeout=timeout)
            return client.infer(
                self.model, inputs, outputs=outputs
            )  # the socket timeouts of _client(timeout)

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


_AUTH_STATUSES = frozenset({"401", "403", "StatusCode.UNAUTHENTICATED", "StatusCode.PERMISSION_DENIED"})
#: What Triton 2.51 answers while a backend stub is dead or was killed under the request (INTERNAL / HTTP 500):
#: "Stub process 'ofa_0_0' is not healthy." The supervisor reloads the model within seconds.
_DEAD_STUB = re.compile(r"stub process\b.*\bnot healthy", re.IGNORECASE)
#: NOT_FOUND / HTTP 404 for a model the server knows but has not loaded (being unloaded or loaded: a heal, a
#: reload): "Request for unknown model: 'caption' has no available versions". A model the server does not know at
#: all ("... is not found") is not transient.
_RELOADING = re.compile(r"has no available versions|is not at ready state|is not ready", re.IGNORECASE)
#: A TLS handshake that failed (gRPC says UNAVAILABLE): a certificate does not fix itself, so never retried.
_TLS_FAILURE = re.compile(r"ssl|handshake|certificate", re.IGNORECASE)


def grpc_service_config(max_attempts: int = GRPC_POLICY_ATTEMPTS) -> dict[str, Any]:
    """A gRPC service config whose retry policy makes gRPC resend a KServe ``ModelInfer`` answered UNAVAILABLE
    (``max_attempts`` attempts in all, 2-5; backoff from 0.1 s up to 1 s with gRPC's full jitter), for the channel
    argument ``("grpc.service_config", json.dumps(...))`` with ``("grpc.enable_retries", 1)``.

    gRPC retries only what never produced a response (a status in a trailers-only answer, a failed connection),
    only the statuses listed (UNAVAILABLE here: not a dead stub's INTERNAL nor a reload's NOT_FOUND), within the
    call's own deadline, and it cannot tell Triton's UNAVAILABLE for a refused key from a transient one.
    """
    return {
        "methodConfig": [
            {
                "name": [{"service": "inference.GRPCInferenceService", "method": "ModelInfer"}],
                "retryPolicy": {
                    "maxAttempts": max(2, min(5, max_attempts)),
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }


def _gave_up(error: CaptionError, retries: int, seconds: float) -> CaptionError:
    """``error`` as raised by a call that made ``retries`` retries in ``seconds`` (said in the message)."""
    error.retries = retries
    if retries:
        note = f" (gave up after {retries} {'retry' if retries == 1 else 'retries'} in {seconds:.1f} s)"
        error.message += note
        error.args = (error.message,)
    return error


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
        # Triton answers a request without the header that a restricted API wants with "... is restricted,
        # expecting header '<name>'": HTTP 403, and over gRPC UNAVAILABLE, which must not be retried.
        if status in _AUTH_STATUSES or "is restricted, expecting header" in message:
            return AuthenticationError(message, status or None)
        if status in ("StatusCode.INVALID_ARGUMENT", "400"):
            return InvalidInputError(message, status)
        if status in ("StatusCode.UNAVAILABLE", "503", "502"):  # 502: a proxy whose server is restarting
            tls = status == "StatusCode.UNAVAILABLE" and bool(_TLS_FAILURE.search(message))
            return ServerUnavailableError(message, status, transient=not tls)
        if status == "StatusCode.DEADLINE_EXCEEDED" or "timed out" in message.lower():
            return CaptionTimeoutError(message, status)
        if _DEAD_STUB.search(message) or (
            status in ("StatusCode.NOT_FOUND", "404") and _RELOADING.search(message)
        ):
            return ServerUnavailableError(message, status)
        if not status and any(s in message.lower() for s in ("connection refused", "failed to connect")):
            return ServerUnavailableError(message, status)
        return CaptionError(message, status or None)
    if isinstance(exc, TimeoutError) or type(exc).__name__ in ("timeout", "Timeout"):
        return CaptionTimeoutError(f"no answer in time: {exc}")
    if isinstance(exc, ssl.SSLError):
        return ServerUnavailableError(f"TLS handshake with the server failed: {exc}", transient=False)
    if isinstance(exc, ConnectionError | OSError):
        return ServerUnavailableError(f"cannot reach the server: {exc}")
    if isinstance(exc, http.client.HTTPException) and "closed" in str(exc).lower():
        # geventhttpclient's HTTPConnectionClosed: the server closed the connection (stopping, restarting).
        return ServerUnavailableError(f"the server closed the connection: {exc}")
    return CaptionError(f"{type(exc).__name__}: {exc}")
