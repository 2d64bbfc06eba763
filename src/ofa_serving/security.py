"""Who may call what on tritonserver, and whether the server may be exposed at all.

* **Keys.** The admin key (header :data:`ADMIN_HEADER`) guards every API that is not public: shared memory
  (system and CUDA), logging, trace, model repository, model config and statistics (:data:`ADMIN_APIS`), over
  HTTP and gRPC, always. The optional inference key (header :data:`API_HEADER`, ``OFA_API_KEY`` /
  ``OFA_API_KEY_FILE``) guards inference. Health and metadata stay open. Triton allows a category in one group
  only, hence two groups with two headers; on gRPC a header ``h`` is sent as metadata ``triton-grpc-protocol-h``
  (:func:`grpc_headers`). :func:`restricted_api_flags` builds the flags, :func:`load_secret` reads ``X`` or
  ``X_FILE``.
* **gRPC TLS.** :func:`grpc_tls_flags` maps ``OFA_GRPC_TLS_CERT`` / ``_KEY`` / ``_CA`` (CA = mutual TLS) to
  Triton's ``--grpc-use-ssl*`` flags. HTTP has no TLS flag in Triton: terminate HTTPS in front of it.
* **Known vulnerabilities.** :data:`CVES` lists the published CVEs that affect Triton 2.51 with the release that
  fixes each; :func:`detect_runtime` finds the version of the server that will run (the nvidia-pytriton wheel's,
  or an NGC image's ``TRITON_VERSION``), and :func:`check_exposure` refuses a non-loopback bind address for a
  server that still has any of them, unless ``OFA_ALLOW_UNPATCHED_TRITON`` is set.

Secrets never appear in a log line or an error message here. They do appear on tritonserver's command line
(Triton takes them nowhere else), which any local user can read in ``/proc/<pid>/cmdline`` unless ``/proc`` is
mounted with ``hidepid``: see docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import ipaddress
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .settings import SecuritySettings, SettingsError

__all__ = [
    "ADMIN_HEADER",
    "API_HEADER",
    "GRPC_HEADER_PREFIX",
    "ADMIN_APIS",
    "INFERENCE_APIS",
    "Cve",
    "CVES",
    "TritonRuntime",
    "UnpatchedServerError",
    "load_secret",
    "admin_key_from_settings",
    "api_key_from_settings",
    "new_secret",
    "restricted_api_flags",
    "key_file_path",
    "write_key_file",
    "read_key_file",
    "remove_key_file",
    "grpc_tls_flags",
    "grpc_headers",
    "detect_runtime",
    "is_loopback",
    "check_exposure",
    "unpatched_warning",
]

#: Header carrying the admin key (HTTP; gRPC metadata ``triton-grpc-protocol-ofa-admin-key``).
ADMIN_HEADER = "ofa-admin-key"
#: Header carrying the inference key when ``OFA_API_KEY`` is set (gRPC: ``triton-grpc-protocol-ofa-api-key``).
API_HEADER = "ofa-api-key"
#: Triton's restricted gRPC protocol reads the metadata key ``<prefix><header>``.
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
#: Every category of Triton's restricted APIs except health, metadata and inference: the admin key's.
ADMIN_APIS = ("shared-memory", "logging", "trace", "model-repository", "model-config", "statistics")
#: The inference key's categories.
INFERENCE_APIS = ("inference",)

# Keys go into a command-line flag `<apis>:<header>=<key>` and an HTTP header: no separators, no spaces.
_KEY_RE = re.compile(r"[A-Za-z0-9._~+/-]{16,}")
_KEY_RULE = "at least 16 characters from A-Z a-z 0-9 . _ ~ + / - (e.g. `openssl rand -hex 32`)"


# ------------------------------------------------------------------------------------------------ keys


def load_secret(name: str, value: str | None, path: Path | None) -> str | None:
    """The secret of environment variable ``name`` (``value``) or of ``name``_FILE (the file at ``path``).

    Both set, an unreadable or empty file, or a key with other characters than :data:`_KEY_RULE` allows raise
    :class:`SettingsError` naming the variable (and the file), never the value. ``None`` when neither is set.
    """
    if value and path:
        raise SettingsError(f"set environment variable {name} or {name}_FILE, not both")
    if path:
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise SettingsError(
                f"environment variable {name}_FILE: cannot read {path} ({exc.strerror})"
            ) from None
        if not value:
            raise SettingsError(f"environment variable {name}_FILE: {path} is empty")
        source = f"environment variable {name}_FILE ({path})"
    else:
        source = f"environment variable {name}"
    if not value:
        return None
    if not _KEY_RE.fullmatch(value):
        raise SettingsError(f"{source}: the key must be {_KEY_RULE} (its value is not shown)")
    return value


def new_secret() -> str:
    """A fresh random key (URL-safe, 32 characters)."""
    return secrets.token_urlsafe(24)


def admin_key_from_settings(settings: SecuritySettings) -> str:
    """``OFA_ADMIN_KEY`` or ``OFA_ADMIN_KEY_FILE``, else a fresh random key (operators who never call the admin
    APIs need none)."""
    return load_secret("OFA_ADMIN_KEY", settings.admin_key, settings.admin_key_file) or new_secret()


def api_key_from_settings(settings: SecuritySettings) -> str | None:
    """``OFA_API_KEY`` or ``OFA_API_KEY_FILE``; ``None`` (inference open) when neither is set."""
    return load_secret("OFA_API_KEY", settings.api_key, settings.api_key_file)


def key_file_path(http_port: int) -> Path:
    """Where a server started on ``http_port`` leaves its admin key for local tools (the probe):
    ``<tmp>/ofa-admin-key-<port>``, readable by its owner only."""
    return Path(tempfile.gettempdir()) / f"ofa-admin-key-{int(http_port)}"


def write_key_file(http_port: int, key: str) -> Path | None:
    """Leave ``key`` in :func:`key_file_path` (mode 0600, written under a fresh name and renamed, so that a link or
    a file planted there is replaced, not followed). ``None`` when that fails (e.g. another user's file in a
    sticky /tmp): local tools then need ``OFA_ADMIN_KEY``."""
    path = key_file_path(http_port)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    return path


def read_key_file(http_port: int) -> str | None:
    """The admin key left by the server on ``http_port`` (:func:`write_key_file`); ``None`` when there is none, or
    it is not a regular file of this user that only this user can read."""
    path = key_file_path(http_port)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd) as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            return None
        key = handle.read().strip()
    return key if _KEY_RE.fullmatch(key) else None


def remove_key_file(http_port: int, key: str) -> None:
    """Remove :func:`key_file_path` if it still holds ``key`` (a newer server on the port keeps its own)."""
    if read_key_file(http_port) == key:
        with contextlib.suppress(OSError):
            key_file_path(http_port).unlink()


def restricted_api_flags(admin_key: str, api_key: str | None = None) -> list[str]:
    """tritonserver flags: :data:`ADMIN_APIS` behind ``admin_key``, inference behind ``api_key`` if given.

    HTTP (``--http-restricted-api``) and gRPC (``--grpc-restricted-protocol``) alike; one flag per group.
    """
    if not admin_key:
        raise ValueError("the admin key is required")
    groups = [(ADMIN_APIS, ADMIN_HEADER, admin_key)]
    if api_key:
        groups.append((INFERENCE_APIS, API_HEADER, api_key))
    flags = []
    for apis, header, key in groups:
        spec = f"{','.join(apis)}:{header}={key}"
        flags += [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]
    return flags


def grpc_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` as gRPC metadata for Triton's restricted protocols (``ofa-api-key`` ->
    ``triton-grpc-protocol-ofa-api-key``); what ``tritonclient.grpc``'s ``headers=`` takes."""
    return {f"{GRPC_HEADER_PREFIX}{k}": v for k, v in headers.items()}


def grpc_tls_flags(cert: Path | None, key: Path | None, ca: Path | None = None) -> list[str]:
    """tritonserver flags serving gRPC over TLS with ``cert``/``key``; with ``ca``, clients must present a
    certificate it signed (mutual TLS). ``[]`` when none is set; a half configuration or a missing file raises
    :class:`SettingsError` naming the setting."""
    if not (cert or key or ca):
        return []
    if not (cert and key):
        raise SettingsError(
            "environment variables OFA_GRPC_TLS_CERT and OFA_GRPC_TLS_KEY go together (OFA_GRPC_TLS_CA adds "
            "client certificates); set both or neither"
        )
    for name, path in (("OFA_GRPC_TLS_CERT", cert), ("OFA_GRPC_TLS_KEY", key), ("OFA_GRPC_TLS_CA", ca)):
        if path is not None and not path.is_file():
            raise SettingsError(f"environment variable {name}: {path} is not a file")
    flags = [
        "--grpc-use-ssl=true",
        f"--grpc-server-cert={Path(cert).resolve()}",
        f"--grpc-server-key={Path(key).resolve()}",
    ]
    if ca:
        flags += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={Path(ca).resolve()}"]
    return flags


# ------------------------------------------------------------------------------------- known vulnerabilities


@dataclass(frozen=True)
class Cve:
    """A published vulnerability of Triton: the NGC release and the server version that fix it, and where it is
    described."""

    id: str
    what: str
    fixed_release: str  # NGC container release, YY.MM
    fixed_version: str  # Triton server version of that release
    source: str


_AUG_2025 = (
    "NVIDIA security bulletin for Triton, Aug 2025 (https://nvidia.custhelp.com/app/answers/detail/a_id/5687)"
)
_LATER = "NVIDIA product-security bulletins for Triton (5734, 5816, 5828, 5848, 5853, 5865, 5875)"

#: The CVEs that affect Triton 2.51 (NGC 24.10), oldest first. Release -> server version: 25.07 = 2.59.1,
#: 25.08 = 2.60.0, 25.10 = 2.62.0 (Triton's release notes); 26.07 = 2.71.0 follows the monthly numbering
#: (26.05 = 2.69.0). The 2026 bulletins say "fixed between 26.02 and 26.07": 26.07 is the safe bound.
CVES: tuple[Cve, ...] = (
    Cve("CVE-2025-23310", "HTTP chunked transfer encoding: stack overflow (crash, code execution), CVSS 9.8",
        "25.07", "2.59.1", _AUG_2025 + "; Trail of Bits; reproduced here on 2.51"),
    Cve("CVE-2025-23311", "HTTP chunked transfer encoding: stack overflow, CVSS 9.8", "25.07", "2.59.1", _AUG_2025),
    Cve("CVE-2025-23317", "HTTP server: crafted request, CVSS 9.1", "25.07", "2.59.1", _AUG_2025),
    Cve("CVE-2025-23319", "Python backend: write beyond its shared memory (code execution)", "25.07", "2.59.1",
        _AUG_2025 + "; Wiz Research, Aug 2025"),
    Cve("CVE-2025-23320", "Python backend: error message leaks the shared-memory region name", "25.07", "2.59.1",
        _AUG_2025 + "; Wiz Research, Aug 2025"),
    Cve("CVE-2025-23334", "Python backend: read beyond its shared memory", "25.07", "2.59.1",
        _AUG_2025 + "; Wiz Research, Aug 2025"),
    Cve("CVE-2025-23318", "Python backend: shared-memory handling", "25.07", "2.59.1", _AUG_2025),
    Cve("CVE-2025-23333", "Python backend: shared-memory handling", "25.07", "2.59.1", _AUG_2025),
    Cve("CVE-2025-23316", "Python backend: code execution through the model name of model-control APIs",
        "25.08", "2.60.0", _LATER + ", Sep 2025"),
    Cve("CVE-2025-33201", "denial of service from an oversized payload", "25.10", "2.62.0", _LATER + ", Dec 2025"),
    Cve("CVE-2025-33211", "denial of service from an oversized payload", "25.10", "2.62.0", _LATER + ", Dec 2025"),
    Cve("CVE-2026-24207", "authentication bypass, CVSS 9.8", "26.07", "2.71.0", _LATER + ", 2026"),
    Cve("CVE-2026-24206", "authentication bypass", "26.07", "2.71.0", _LATER + ", 2026"),
    Cve("CVE-2026-47481", "authentication bypass", "26.07", "2.71.0", _LATER + ", 2026"),
    Cve("CVE-2026-47625", "missing authorization", "26.07", "2.71.0", _LATER + ", 2026"),
    Cve("CVE-2026-47627", "path traversal, CVSS 9.8", "26.07", "2.71.0", _LATER + ", 2026"),
)  # fmt: skip

#: nvidia-pytriton wheel -> the Triton server it bundles (its libtritonserver reports this version).
PYTRITON_TRITON = {"0.7.0": "2.51.0"}


def _as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


@dataclass(frozen=True)
class TritonRuntime:
    """The server that will run: its version (``2.51.0``), its NGC release (``24.10``) when known, and where that
    was read. ``version`` ``None``: unknown (treated as vulnerable)."""

    version: str | None
    release: str | None
    source: str

    def unfixed(self) -> tuple[Cve, ...]:
        """The :data:`CVES` this server still has (all of them when its version is unknown)."""
        if self.release:
            return tuple(c for c in CVES if _as_tuple(self.release) < _as_tuple(c.fixed_release))
        if self.version:
            return tuple(c for c in CVES if _as_tuple(self.version) < _as_tuple(c.fixed_version))
        return CVES

    def describe(self) -> str:
        """``Triton 2.51.0 (nvidia-pytriton 0.7.0)``-style text."""
        if self.version is None:
            return f"Triton of unknown version ({self.source})"
        release = f", NGC {self.release}" if self.release else ""
        return f"Triton {self.version}{release} ({self.source})"


def detect_runtime(binary: Path | None = None, environ: Mapping[str, str] | None = None) -> TritonRuntime:
    """The version of the tritonserver at ``binary`` (default: an NGC image's, else the nvidia-pytriton wheel's).

    An NGC image holds ``TRITON_VERSION`` in the server's root (``/opt/tritonserver``) and sets
    ``NVIDIA_TRITON_SERVER_VERSION`` (the release, ``24.10``); the wheel's server is known from the wheel's
    version (:data:`PYTRITON_TRITON`).
    """
    environ = os.environ if environ is None else environ
    root = binary.resolve().parent.parent if binary is not None else Path("/opt/tritonserver")
    marker = root / "TRITON_VERSION"
    if marker.is_file():
        version = marker.read_text().strip() or None
        release = environ.get("NVIDIA_TRITON_SERVER_VERSION", "").strip() or None
        return TritonRuntime(version, release, str(marker))
    if binary is None or "pytriton" in binary.parts:
        try:
            wheel = importlib.metadata.version("nvidia-pytriton")
        except importlib.metadata.PackageNotFoundError:
            return TritonRuntime(None, None, "no TRITON_VERSION and no nvidia-pytriton wheel")
        return TritonRuntime(PYTRITON_TRITON.get(wheel), None, f"nvidia-pytriton {wheel}")
    return TritonRuntime(None, None, f"no TRITON_VERSION beside {binary}")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (``127.0.0.0/8``, ``::1``, ``localhost``).

    ``""``, ``0.0.0.0``, ``::`` and any other name or address are not loopback.
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class UnpatchedServerError(SettingsError):
    """A server with known, unfixed vulnerabilities was asked to listen beyond loopback."""


def check_exposure(host: str, runtime: TritonRuntime, allow_unpatched: bool = False) -> str | None:
    """Refuse to expose a vulnerable server: raise :class:`UnpatchedServerError` naming its CVEs and the fix when
    ``host`` is not loopback and ``runtime`` has unfixed :data:`CVES`, unless ``allow_unpatched``; then return
    the loud warning to print. ``None``: nothing to say."""
    unfixed = runtime.unfixed()
    if is_loopback(host) or not unfixed:
        return None
    if allow_unpatched:
        return unpatched_warning(host, runtime, unfixed)
    newest = max(unfixed, key=lambda c: _as_tuple(c.fixed_release))
    raise UnpatchedServerError(
        f"HOST={host}: refusing to serve {runtime.describe()} beyond loopback: it has {len(unfixed)} unfixed "
        f"vulnerabilities ({', '.join(c.id for c in unfixed)}; fixed in NGC {newest.fixed_release} / Triton "
        f"{newest.fixed_version}). Serve on 127.0.0.1 (unset HOST) or run the patched container image "
        f"(docker/, docs/deployment.md); OFA_ALLOW_UNPATCHED_TRITON=1 starts it anyway at your own risk "
        f"(docs/reliability.md, security)."
    )


def unpatched_warning(host: str, runtime: TritonRuntime, unfixed: tuple[Cve, ...]) -> str:
    """The banner printed when ``OFA_ALLOW_UNPATCHED_TRITON`` exposes a vulnerable server."""
    ids = ", ".join(c.id for c in unfixed)
    lines = [
        f"WARNING: OFA_ALLOW_UNPATCHED_TRITON is set: serving {runtime.describe()} on {host}, beyond loopback.",
        f"It has {len(unfixed)} unfixed vulnerabilities, some exploitable without any key: {ids}.",
        "Anyone who reaches these ports may crash it or run code in it. Use the container image (docker/).",
    ]
    width = max(len(line) for line in lines) + 4
    bar = "#" * width
    return "\n".join([bar, *(f"# {line.ljust(width - 4)} #" for line in lines), bar])
