"""Run the real ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel, without Docker.

Used by ``make serve`` (:mod:`ofa_serving.serve`), the integration tests' session fixture, the load tests and
the benchmark. Typical use::

    from ofa_serving.launcher import TritonServer

    with TritonServer.on_free_ports(model_dir="checkpoints/ofa-tiny-demo", log_file="triton.log") as server:
        print(server.http_url, server.grpc_url, server.metrics_url)   # ready (and warm) here
    # stopped here: SIGTERM, then SIGKILL after the timeout

The wheel holds the server binary, the Python backend, one backend stub per Python version and the local
response cache; :func:`find_triton` locates them, :func:`prepare_backend_dir` assembles a backend directory
(Python backend + the stub of the running Python) once under ``.cache/triton-backends/``, and
:class:`TritonServer` sets the environment the server and its stubs need: ``LD_LIBRARY_PATH`` with
``nvidia_pytriton.libs``, ``PATH`` starting with this Python's ``bin`` (the stub embeds the Python it finds
there, hence this venv's packages) and ``PYTHONPATH`` with this package's source directory.

Every server it starts keeps its non-public APIs (shared memory, logging, trace, model repository and config,
statistics) behind an admin key, optionally inference behind an API key, and optionally serves gRPC over TLS
(:mod:`.security`); :attr:`TritonServer.admin_headers` and :attr:`TritonServer.api_headers` are what a client sends.
A server with known unfixed CVEs (the wheel's 2.51) refuses a non-loopback ``host`` unless ``allow_unpatched``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .security import (
    ADMIN_HEADER,
    API_HEADER,
    UnpatchedServerError,
    admin_key_from_settings,
    api_key_from_settings,
    check_exposure,
    detect_runtime,
    grpc_headers,
    grpc_tls_flags,
    new_secret,
    remove_key_file,
    restricted_api_flags,
    write_key_file,
)
from .settings import SecuritySettings, ServerSettings, load_settings
from .triton_api import TritonHttp, scrape

__all__ = [
    "TritonInstallation",
    "ServerProcess",
    "TritonServer",
    "ServerStartError",
    "find_triton",
    "prepare_backend_dir",
    "free_port",
    "free_ports",
    "repo_root",
    "default_model_repository",
]

PACKAGE_SRC = Path(__file__).resolve().parent.parent


class ServerStartError(RuntimeError):
    """tritonserver could not be started, exited early or did not become ready in time."""


def repo_root() -> Path:
    """The checkout this package runs from (the directory holding pyproject.toml), else the current directory."""
    candidate = PACKAGE_SRC.parent
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd()


def default_model_repository() -> Path:
    """``model_repository/`` of this checkout (or of the current directory)."""
    for base in (repo_root(), Path.cwd()):
        if (base / "model_repository").is_dir():
            return base / "model_repository"
    raise ServerStartError("no model_repository/ found; pass model_repository= or set OFA_MODEL_REPOSITORY")


@dataclass(frozen=True)
class TritonInstallation:
    """Where the parts of the server live inside the installed nvidia-pytriton wheel."""

    binary: Path
    python_backend: Path
    stub: Path
    caches: Path
    libs: Path


def find_triton() -> TritonInstallation:
    """Locate tritonserver, the Python backend, this Python's stub and the caches in the nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerStartError(
            "the nvidia-pytriton wheel (which ships tritonserver) is not installed in this Python "
            f"({sys.executable}); run `make setup`"
        )
    pkg = Path(next(iter(spec.submodule_search_locations)))
    root = pkg / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = TritonInstallation(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        caches=root / "caches",
        libs=pkg.parent / "nvidia_pytriton.libs",
    )
    for name, path in vars(found).items():
        if not path.exists():
            raise ServerStartError(f"nvidia-pytriton is incomplete: no {name} at {path} (Python {version})")
    return found


def prepare_backend_dir(
    installation: TritonInstallation | None = None, directory: str | Path | None = None
) -> Path:
    """A ``--backend-directory`` with the Python backend and the stub of the running Python (idempotent).

    Defaults to ``.cache/triton-backends/python<X.Y>/`` in the checkout. Files are copied only when missing or
    changed, through a temporary name, so concurrent callers do not see half-written files.
    """
    installation = installation or find_triton()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    directory = (
        Path(directory) if directory else repo_root() / ".cache" / "triton-backends" / f"python{version}"
    )
    target = directory / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = [p for p in installation.python_backend.iterdir() if p.is_file()] + [installation.stub]
    for src in sources:
        dst = target / src.name
        st = src.stat()
        if dst.exists() and dst.stat().st_size == st.st_size and dst.stat().st_mtime == st.st_mtime:
            continue
        fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{src.name}.")
        os.close(fd)
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    return directory


def drain_file_path(http_port: int) -> Path:
    """``<tmp>/ofa-draining-<port>``: while it exists, the server on ``http_port`` refuses new requests with
    UNAVAILABLE (its ``preprocess`` reads ``OFA_DRAIN_FILE``); the supervisor creates it when a graceful stop
    begins, each start removes it."""
    return Path(tempfile.gettempdir()) / f"ofa-draining-{int(http_port)}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that are free on ``host`` right now."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _check_numpy() -> None:
    try:
        import numpy
    except ImportError:
        return
    if int(numpy.__version__.split(".")[0]) >= 2:
        raise ServerStartError(
            f"numpy {numpy.__version__} is installed; the Python backend stub of tritonserver 2.51 corrupts "
            "BYTES tensors under numpy 2: install numpy<2 (make setup does)"
        )


try:  # die with the launching thread's process (Linux); resolved before fork, called in the child
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _flag(command: Sequence[str], name: str) -> str | None:
    """The value of ``name`` in a command line (``--name=value`` or ``--name value``), else ``None``."""
    for index, arg in enumerate(command):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and index + 1 < len(command):
            return command[index + 1]
    return None


class ServerProcess:
    """One tritonserver process: its command line, endpoints and keys; start, readiness, graceful stop.

    Built from a command line (:meth:`from_command`: the container image's ``tritonserver ...``, with
    ``tritonserver`` on PATH and its environment ready), or from settings by :class:`TritonServer`. The process runs
    in a session of its own (its stubs too: they can be found and killed once it is gone); with ``die_with_parent``
    Linux sends it SIGTERM when the thread that started it exits. While it runs, the owner-only key file holds its
    admin key for local tools (:func:`~ofa_serving.security.write_key_file`).

    Args:
        command: the tritonserver command line (:meth:`command` of a subclass builds it instead).
        host: bind address of the endpoints; http_port, grpc_port, metrics_port: their ports.
        exit_timeout_secs: how long the server lets in-flight requests finish after SIGTERM.
        log_file: file receiving the server's stdout and stderr; ``None`` = inherit (foreground use).
        die_with_parent: ask Linux to SIGTERM the server when the thread that started it exits.
        admin_key: the key of the admin APIs (header ``ofa-admin-key``) it was given; ``None`` = unknown.
        api_key: the inference key it requires (header ``ofa-api-key``); ``None`` = inference open.
    """

    def __init__(
        self,
        command: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        exit_timeout_secs: int = 30,
        log_file: str | Path | None = None,
        die_with_parent: bool = True,
        admin_key: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self._command = list(command)
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.exit_timeout_secs = exit_timeout_secs
        self.log_file = Path(log_file) if log_file else None
        self.die_with_parent = die_with_parent
        self.admin_key = admin_key
        self.api_key = api_key or None
        self._tls_flags = [a for a in self._command if a.startswith("--grpc-use-ssl")]
        self.process: subprocess.Popen | None = None
        self._log_handle = None

    @classmethod
    def from_command(
        cls, command: Sequence[str], *, admin_key: str | None = None, api_key: str | None = None
    ) -> ServerProcess:
        """The server that ``command`` starts; endpoints and exit timeout read from its flags (tritonserver's
        defaults where absent: all addresses, ports 8000/8001/8002, 30 s)."""
        timeout = _flag(command, "--exit-timeout-secs") or ""
        return cls(
            command,
            host=_flag(command, "--http-address") or "0.0.0.0",
            http_port=int(_flag(command, "--http-port") or 8000),
            grpc_port=int(_flag(command, "--grpc-port") or 8001),
            metrics_port=int(_flag(command, "--metrics-port") or 8002),
            exit_timeout_secs=int(timeout) if timeout.isdigit() else 30,
            admin_key=admin_key,
            api_key=api_key,
        )

    # -- addresses -------------------------------------------------------------------------------------
    @property
    def _connect_host(self) -> str:
        return "127.0.0.1" if self.host in ("", "0.0.0.0") else ("::1" if self.host == "::" else self.host)

    def _endpoint(self, port: int) -> str:
        """``host:port`` to connect to (an IPv6 host in brackets)."""
        host = self._connect_host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def http_address(self) -> str:
        """``host:port`` of the HTTP endpoint (what ``tritonclient.http`` and ``CaptionClient`` take)."""
        return self._endpoint(self.http_port)

    @property
    def grpc_address(self) -> str:
        """``host:port`` of the gRPC endpoint (what ``tritonclient.grpc`` and ``CaptionClient`` take)."""
        return self._endpoint(self.grpc_port)

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the KServe v2 HTTP endpoint."""
        return f"http://{self.http_address}"

    @property
    def grpc_url(self) -> str:
        """``grpc://host:port`` of the KServe v2 gRPC endpoint (CaptionClient accepts it)."""
        return f"grpc://{self.grpc_address}"

    @property
    def metrics_url(self) -> str:
        """``http://host:port/metrics``: Prometheus text."""
        return f"http://{self._endpoint(self.metrics_port)}/metrics"

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that open the admin APIs (``urllib``, ``tritonclient.http``'s ``headers=``)."""
        return {ADMIN_HEADER: self.admin_key} if self.admin_key else {}

    def admin(self, timeout: float = 5.0) -> TritonHttp:
        """A client of this server's HTTP API that sends :attr:`admin_headers` (repository, statistics, config)."""
        return TritonHttp(self.http_url, self.admin_headers, timeout)

    @property
    def api_headers(self) -> dict[str, str]:
        """HTTP headers that inference needs (``{}`` when inference is open)."""
        return {API_HEADER: self.api_key} if self.api_key else {}

    @property
    def grpc_admin_headers(self) -> dict[str, str]:
        """:attr:`admin_headers` as gRPC metadata (``tritonclient.grpc``'s ``headers=``)."""
        return grpc_headers(self.admin_headers)

    @property
    def grpc_api_headers(self) -> dict[str, str]:
        """:attr:`api_headers` as gRPC metadata."""
        return grpc_headers(self.api_headers)

    @property
    def grpc_tls(self) -> bool:
        """Whether the gRPC endpoint speaks TLS (clients need ``ssl=True`` and the CA)."""
        return bool(self._tls_flags)

    @property
    def pid(self) -> int | None:
        """PID of the tritonserver process (``None`` before start)."""
        return self.process.pid if self.process else None

    @property
    def drain_file(self) -> Path:
        """The flag that makes ``preprocess`` refuse new requests while this server drains (:func:`drain_file_path`)."""
        return drain_file_path(self.http_port)

    # -- process ---------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The tritonserver command line."""
        return list(self._command)

    def environment(self) -> dict[str, str]:
        """The server's environment: ours plus ``OFA_DRAIN_FILE``."""
        return {**os.environ, "OFA_DRAIN_FILE": str(self.drain_file)}

    def _check_start(self) -> None:
        """Refuse to start (:class:`ServerStartError`) what cannot run; nothing to check for a plain command."""

    def start(self) -> ServerProcess:
        """Start tritonserver in the background (its own process group); returns at once. Again after an exit:
        the same command on the same ports."""
        if self.process is not None and self.process.poll() is None:
            raise ServerStartError(f"already running (pid {self.process.pid})")
        self._check_start()
        cmd, env = self.command(), self.environment()
        Path(env["OFA_DRAIN_FILE"]).unlink(missing_ok=True)  # a new server is not draining
        out = None
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = self._log_handle = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        atexit.register(self.stop)
        # for local tools without OFA_ADMIN_KEY (the image's HEALTHCHECK probe): owner-only
        if self.admin_key:
            write_key_file(self.http_port, self.admin_key)
        return self

    def is_ready(self) -> bool:
        """True when the server answers ``/v2/health/ready`` (all models loaded, warm-up done)."""
        return TritonHttp(self.http_url).server_ready(timeout=2.0)

    def wait_ready(self, timeout: float = 300.0) -> ServerProcess:
        """Block until ready; raise :class:`ServerStartError` (with the log's tail) if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None:
                raise ServerStartError("not started")
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(f"tritonserver exited with code {code} before ready{self._log_tail()}")
            if self.is_ready():
                return self
            time.sleep(0.25)
        raise ServerStartError(f"tritonserver not ready after {timeout:.0f} s{self._log_tail()}")

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the server to exit (foreground use); its exit code."""
        if self.process is None:
            raise ServerStartError("not started")
        return self.process.wait(timeout)

    def terminate(self) -> None:
        """Send SIGTERM (graceful: in-flight requests get up to ``exit_timeout_secs``); does not wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the server by its PID: SIGTERM, then SIGKILL after ``timeout`` s (default exit timeout + 10).

        Leftovers of its process group (backend stubs) are killed too. Returns the exit code; idempotent.
        """
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.exit_timeout_secs + 10 if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own group (start_new_session): stubs left behind
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self.admin_key:
            remove_key_file(self.http_port, self.admin_key)
        return proc.returncode

    def metrics(self) -> str:
        """The Prometheus text of the metrics endpoint."""
        return scrape(self.metrics_url)

    def _log_tail(self, lines: int = 40) -> str:
        if self.log_file is None or not self.log_file.exists():
            return " (see its output above)"
        text = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        return f"; last lines of {self.log_file}:\n" + "\n".join(text)

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop(timeout=5)
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pid={self.pid}, http={self.http_address}, grpc={self.grpc_address})"


class TritonServer(ServerProcess):
    """tritonserver from the nvidia-pytriton wheel serving a model repository; a context manager (start + ready,
    then stop).

    Args:
        model_repository: the Triton model repository (default: ``model_repository/`` of the checkout).
        model_dir: checkpoint directory, exported to the models as ``OFA_MODEL_DIR`` (default: inherited).
        host: bind address of the HTTP, gRPC and metrics endpoints.
        http_port, grpc_port, metrics_port: ports (0 is not allowed: use :meth:`on_free_ports`).
        response_cache_bytes: size of the local response cache; 0 runs without a cache.
        exit_timeout_secs: how long the server lets in-flight requests finish after SIGTERM.
        log_verbose: ``--log-verbose`` level.
        log_file: file receiving the server's stdout and stderr; ``None`` = inherit (foreground use).
        env: extra environment variables for the server and its models (e.g. ``{"OFA_WARMUP": "0"}``).
        extra_args: more tritonserver flags, appended last.
        die_with_parent: ask Linux to SIGTERM the server when the thread that started it exits.
        admin_key: the key of the admin APIs (header ``ofa-admin-key``: shared memory, logging, trace, model
            repository and config, statistics; always restricted); ``None`` = a fresh random key.
        model_control: explicit model control, every model loaded at start (what
            :class:`~ofa_serving.supervisor.Supervisor` needs to reload a model); default: when ``admin_key`` is
            given (the supervisor holds it), else ``--model-control-mode=none``.
        api_key: inference then needs header ``ofa-api-key``; ``None`` = inference open.
        grpc_tls_cert, grpc_tls_key, grpc_tls_ca: gRPC over TLS with this certificate and key; with a CA, mutual
            TLS (clients present a certificate it signed). The HTTP readiness check is unaffected.
        allow_unpatched: start even on a non-loopback ``host`` when this server has known unfixed CVEs (a loud
            warning); otherwise :meth:`start` refuses.
    """

    def __init__(
        self,
        model_repository: str | Path | None = None,
        model_dir: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        response_cache_bytes: int = 64 * 1024 * 1024,
        exit_timeout_secs: int = 30,
        log_verbose: int = 0,
        log_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        die_with_parent: bool = True,
        admin_key: str | None = None,
        model_control: bool | None = None,
        api_key: str | None = None,
        grpc_tls_cert: str | Path | None = None,
        grpc_tls_key: str | Path | None = None,
        grpc_tls_ca: str | Path | None = None,
        allow_unpatched: bool = False,
    ) -> None:
        super().__init__(
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            exit_timeout_secs=exit_timeout_secs,
            log_file=log_file,
            die_with_parent=die_with_parent,
            admin_key=admin_key or new_secret(),
            api_key=api_key,
        )
        self.model_repository = Path(model_repository or default_model_repository()).resolve()
        self.model_dir = Path(model_dir).resolve() if model_dir else None
        self.response_cache_bytes = response_cache_bytes
        self.log_verbose = log_verbose
        self.extra_env = dict(env or {})
        self.extra_args = list(extra_args)
        self.model_control = admin_key is not None if model_control is None else model_control
        tls = [Path(p) if p else None for p in (grpc_tls_cert, grpc_tls_key, grpc_tls_ca)]
        self._tls_flags = grpc_tls_flags(*tls)  # checked here: a bad path fails before anything starts
        self.grpc_tls_cert, self.grpc_tls_key, self.grpc_tls_ca = tls
        self.allow_unpatched = allow_unpatched

    @classmethod
    def from_settings(
        cls,
        settings: ServerSettings | None = None,
        security: SecuritySettings | None = None,
        **overrides,
    ) -> TritonServer:
        """A server configured from :class:`ServerSettings` and :class:`SecuritySettings` (default: read from the
        environment): keys from ``OFA_ADMIN_KEY[_FILE]`` / ``OFA_API_KEY[_FILE]``, gRPC TLS, the exposure rule.

        An ``admin_key`` override means a supervised server (explicit model control, unless ``model_control``
        says otherwise); without it the admin key comes from the environment (else a fresh one), no model control.
        """
        s = settings or load_settings(ServerSettings)
        sec = security or load_settings(SecuritySettings)
        kwargs = {
            "model_repository": s.model_repository,
            "model_dir": s.model_dir,
            "host": s.host,
            "http_port": s.http_port,
            "grpc_port": s.grpc_port,
            "metrics_port": s.metrics_port,
            "response_cache_bytes": s.response_cache_bytes,
            "exit_timeout_secs": s.exit_timeout_secs,
            "log_verbose": s.log_verbose,
            "api_key": api_key_from_settings(sec),
            "grpc_tls_cert": sec.grpc_tls_cert,
            "grpc_tls_key": sec.grpc_tls_key,
            "grpc_tls_ca": sec.grpc_tls_ca,
            "allow_unpatched": sec.allow_unpatched_triton,
        }
        if "admin_key" not in overrides:
            kwargs["admin_key"] = admin_key_from_settings(sec)
            kwargs["model_control"] = False
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def on_free_ports(cls, model_repository=None, model_dir=None, **kwargs) -> TritonServer:
        """A server on three free ports of ``host`` (default 127.0.0.1): for tests and benchmarks."""
        http, grpc, metrics = free_ports(3, kwargs.get("host", "127.0.0.1"))
        return cls(
            model_repository, model_dir, http_port=http, grpc_port=grpc, metrics_port=metrics, **kwargs
        )

    def command(self) -> list[str]:
        """The tritonserver command line (needs :func:`find_triton`; prepares the backend directory)."""
        triton = find_triton()
        cmd = [
            str(triton.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={prepare_backend_dir(triton)}",
            f"--cache-directory={triton.caches}",
            "--model-control-mode=none",
            "--strict-readiness=true",
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={self.exit_timeout_secs}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.model_control:  # supervised: only the supervisor (holding the key) may reload models
            from .supervisor import model_control_flags

            cmd.remove("--model-control-mode=none")
            cmd += model_control_flags(self.admin_key, self.api_key)
        else:
            cmd += restricted_api_flags(self.admin_key, self.api_key)
        cmd += self._tls_flags
        if self.response_cache_bytes > 0:
            cmd.append(f"--cache-config=local,size={self.response_cache_bytes}")
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The server's environment: ours plus LD_LIBRARY_PATH, PATH, PYTHONPATH, OFA_MODEL_DIR, OFA_DRAIN_FILE and
        ``env``."""
        triton = find_triton()
        env = super().environment()

        def prepend(name: str, *parts: str) -> None:
            old = [p for p in env.get(name, "").split(os.pathsep) if p and p not in parts]
            env[name] = os.pathsep.join([*parts, *old])

        libs = [str(triton.libs)]
        if sysconfig.get_config_var("Py_ENABLE_SHARED") and sysconfig.get_config_var("LIBDIR"):
            libs.append(sysconfig.get_config_var("LIBDIR"))  # this Python's libpython for the stub
        prepend("LD_LIBRARY_PATH", *libs)
        prepend("PATH", str(Path(sys.executable).parent))
        prepend("PYTHONPATH", str(PACKAGE_SRC))
        env["PYTHONUNBUFFERED"] = "1"
        # the server has the keys on its command line; its models need none
        for name in ("OFA_ADMIN_KEY", "OFA_API_KEY"):
            env.pop(name, None)
        if self.model_dir is not None:
            env["OFA_MODEL_DIR"] = str(self.model_dir)
        env.update(self.extra_env)
        return env

    def _check_start(self) -> None:
        """numpy<2 for the stub, the exposure rule for a server with known CVEs, an existing checkpoint."""
        _check_numpy()
        try:
            warning = check_exposure(self.host, detect_runtime(find_triton().binary), self.allow_unpatched)
        except UnpatchedServerError as exc:
            raise ServerStartError(str(exc)) from None
        if warning:
            print(warning, file=sys.stderr, flush=True)
        if self.model_dir is not None and not self.model_dir.is_dir():
            raise ServerStartError(f"checkpoint directory {self.model_dir} does not exist")
