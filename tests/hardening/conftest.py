"""Fixtures of the hardening tests (issue 5): real tritonservers serving the demo checkpoint on free 127.0.0.1 ports.

Both are package-scoped: started on first use, stopped when the last test of tests/hardening is done.

* ``hardened_server``: ``model_repository/`` as committed, with the image limits *configured* below the
  defaults (``OFA_MAX_IMAGE_BYTES`` 2 MiB, ``OFA_MAX_IMAGE_PIXELS`` 16 M) to show that they are settings; bad input
  and security tests.
* ``queue_server``: a :class:`RestartableServer` on a copy of the repository whose queue policies keep
  fewer requests waiting (``ofa`` 4, ``preprocess`` 8; nothing else changed), so that a burst of 56 requests
  overflows them in seconds on 2 CPU cores; overload and fault tests. The fault tests kill its stub, restart it
  and SIGTERM it; whoever asks next gets a fresh one.

* ``locked_server``: the committed repository under supervision (as ``make serve`` runs it) with every lock on: an
  inference key (``OFA_API_KEY``), gRPC over TLS with a certificate made here (:func:`make_tls_material`); warm-up
  off. Security tests.

``tests/integration``'s ``triton_server`` is not visible here (pytest's conftest scoping) and has other settings,
hence servers of our own (about 15-20 s to start each). Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import ipaddress
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from load_tests.loadlib import settled_metrics
from load_tests.testkit.servers import metric_sum, parse_metrics, running, started
from ofa_serving.launcher import TritonServer, default_model_repository
from ofa_serving.processes import stub_processes
from ofa_serving.supervisor import Supervisor, new_admin_key

READY_TIMEOUT_S = 600  # model load + warm-up on a busy 2-core machine
MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_IMAGE_PIXELS = 16_000_000
#: Queue sizes of the overload/fault server's repository copy (the committed repository has 64 for both).
SMALL_QUEUES = {"ofa": 4, "preprocess": 8}
#: Cheap generation settings: the request path is the same at any size.
FAST = {"beam_size": 2, "max_length": 3}


#: The inference key of ``locked_server`` (made up for the tests; a real one comes from OFA_API_KEY[_FILE]).
API_KEY = "test-inference-key-0123456789"


@dataclass(frozen=True)
class TlsMaterial:
    """PEM files made by :func:`make_tls_material`: a CA, a server certificate it signed (127.0.0.1, localhost)
    and a client certificate it signed."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_material(directory: Path) -> TlsMaterial:
    """A throw-away CA and two certificates signed by it, with the ``cryptography`` package (requirements/dev.txt);
    a day of validity."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def write_key(key, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    def certificate(subject: str, key, issuer_key, issuer: str, *, ca: bool = False, extensions=()):
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("ofa test CA", ca_key, ca_key, "ofa test CA", ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    server_cert = certificate(
        "127.0.0.1",
        server_key,
        ca_key,
        "ofa test CA",
        extensions=[san, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = certificate(
        "ofa test client",
        client_key,
        ca_key,
        "ofa test CA",
        extensions=[x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])],
    )
    out = TlsMaterial(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    out.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    out.client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    write_key(server_key, out.server_key)
    write_key(client_key, out.client_key)
    return out


@dataclass
class Locked:
    """``locked_server``: the server, its supervisor (and its log lines), the TLS files."""

    server: TritonServer
    supervisor: Supervisor
    tls: TlsMaterial
    log_lines: list[str] = field(default_factory=list)


@pytest.fixture(scope="package")
def locked_server(demo_checkpoint, tmp_path_factory):
    """A supervised server (explicit model control, the admin key) with an inference key and gRPC over TLS."""
    base = tmp_path_factory.mktemp("locked")
    tls = make_tls_material(base / "tls")
    server = TritonServer.on_free_ports(
        model_dir=demo_checkpoint,
        log_file=base / "triton.log",
        exit_timeout_secs=5,
        admin_key=new_admin_key(),
        api_key=API_KEY,
        grpc_tls_cert=tls.server_cert,
        grpc_tls_key=tls.server_key,
        env={"OFA_WARMUP": "0"},
    )
    with supervised(server, base) as (supervisor, lines):
        yield Locked(server, supervisor, tls, lines)


@contextlib.contextmanager
def supervised(server: TritonServer, base: Path):
    """Start ``server``, supervise it with fast probes (every second), collect the supervisor's log lines; yields
    ``(supervisor, lines)``, stops both afterwards."""
    started(server, READY_TIMEOUT_S)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        print(f"[supervisor] {line}", flush=True)

    supervisor = Supervisor(
        server,
        server.admin_key,
        interval_s=1.0,
        probe_timeout_s=5.0,
        state_file=base / "supervisor.json",
        log=log,
    )
    supervisor.start()
    try:
        yield supervisor, lines
    finally:
        supervisor.stop()
        server.stop(timeout=15)


@pytest.fixture(scope="package")
def hardened_server(demo_checkpoint, tmp_path_factory):
    """A ready server on the committed repository with configured (lowered) image limits."""
    log = tmp_path_factory.mktemp("hardened") / "triton.log"
    server = TritonServer.on_free_ports(
        model_dir=demo_checkpoint,
        log_file=log,
        exit_timeout_secs=5,
        env={"OFA_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES), "OFA_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS)},
    )
    with running(server, READY_TIMEOUT_S, stop_timeout=15):
        yield server


def small_queue_repository(target: Path, queues: dict[str, int] = SMALL_QUEUES) -> Path:
    """Copy ``model_repository/`` to ``target`` with ``max_queue_size`` of each model in ``queues`` replaced.

    Fails if a model has no ``max_queue_size`` line, or more than one: then the committed queue policy changed and
    this copy (and docs/reliability.md) must follow.
    """
    shutil.copytree(default_model_repository(), target, ignore=shutil.ignore_patterns("__pycache__"))
    for model, size in queues.items():
        config = target / model / "config.pbtxt"
        text, count = re.subn(r"max_queue_size: \d+", f"max_queue_size: {size}", config.read_text())
        assert count == 1, f"{model}/config.pbtxt should have exactly one max_queue_size, found {count}"
        config.write_text(text)
    return target


class RestartableServer:
    """One tritonserver at a time on a fixed repository; :meth:`get` starts one when none is running."""

    def __init__(self, repository: Path, model_dir: Path, log_dir: Path, exit_timeout_secs: int = 30):
        self.repository, self.model_dir, self.log_dir = repository, model_dir, log_dir
        self.exit_timeout_secs = exit_timeout_secs
        self.server: TritonServer | None = None
        self.starts = 0

    def get(self) -> TritonServer:
        """The running, ready server; a new one (waited for) if there is none or it is stopping."""
        if self.server is not None and not self._alive_and_ready():
            self.close()  # exited, or draining after a SIGTERM
        if self.server is None:
            self.starts += 1
            self.server = started(
                TritonServer.on_free_ports(
                    self.repository,
                    self.model_dir,
                    log_file=self.log_dir / f"triton-{self.starts}.log",
                    exit_timeout_secs=self.exit_timeout_secs,
                ),
                READY_TIMEOUT_S,
            )
        return self.server

    def _alive_and_ready(self, tries: int = 3) -> bool:
        for attempt in range(tries):
            if self.server.process is None or self.server.process.poll() is not None:
                return False
            if self.server.is_ready():
                return True
            time.sleep(1.0 * (attempt < tries - 1))
        return False

    def restart(self) -> TritonServer:
        """Stop the server (SIGTERM, graceful) and start a new one: the documented recovery of a dead stub."""
        self.close()
        return self.get()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=self.exit_timeout_secs + 10)
            self.server = None


@pytest.fixture(scope="package")
def queue_server(demo_checkpoint, tmp_path_factory):
    """A :class:`RestartableServer` on the small-queue copy of the repository (exit timeout 30 s)."""
    base = tmp_path_factory.mktemp("queue-server")
    slot = RestartableServer(small_queue_repository(base / "model_repository"), demo_checkpoint, base)
    try:
        yield slot
    finally:
        slot.close()


# ----------------------------------------------------------------------------------------------- helpers


def stub_pid_by_model(server: TritonServer) -> dict[str, int]:
    """``{"preprocess": pid, "ofa": pid}``: the live stub of each model (one instance each)."""
    stubs = stub_processes(server.pid)
    out = {s.model: s.pid for s in stubs}
    assert len(out) == len(stubs), f"more than one stub per model: {stubs}"
    return out


def models_ready(server: TritonServer) -> dict[str, bool]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        out = {"server": bool(client.is_server_ready())}
        out.update({m: bool(client.is_model_ready(m)) for m in ("caption", "preprocess", "ofa")})
        return out
    finally:
        client.close()


def png(width: int, height: int, seed: int) -> bytes:
    """A small distinct PNG (different seed = different bytes, so the response cache never answers it)."""
    from load_tests.testkit.images import synthetic_rgb

    buffer = io.BytesIO()
    synthetic_rgb(width, height, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


def model_metric(server: TritonServer, name: str, model: str, settled: bool = False, **labels: str) -> float:
    """The server's metric ``name`` for ``model`` (and ``labels``, e.g. ``reason="CANCELED"``), summed; 0 if absent.

    With ``settled`` the scrape waits until the request counters stop moving (``loadlib.settled_metrics``): Triton
    records a request's statistics just after sending its answer, so an exact count read right after the last
    answer can miss it, or a baseline can miss a previous test's last request and count it later.
    """
    metrics = (
        settled_metrics(server.host, server.metrics_port) if settled else parse_metrics(server.metrics())
    )
    return metric_sum(metrics, name, model=model, **labels) or 0.0


def wait_for(condition, timeout: float, what: str, poll: float = 0.1):
    """``condition()``'s first true value, polled every ``poll`` s; AssertionError naming ``what`` after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def wait_until_preprocessed(
    server: TritonServer, before: float, count: int, timeout: float = 60, poll: float = 0.05
) -> None:
    """Until ``preprocess`` has answered ``count`` more requests than ``before`` (its success count then): they
    are then queued for or inside ``ofa``."""
    deadline = time.monotonic() + timeout
    while model_metric(server, "nv_inference_request_success", "preprocess") < before + count:
        assert time.monotonic() < deadline, "the requests never reached ofa"
        time.sleep(poll)


def fresh_seed() -> int:
    """A seed that differs between runs against the same server (cache misses)."""
    return int(time.time() * 1000) % 1_000_000_000
