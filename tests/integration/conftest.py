"""Session fixture: the real tritonserver (nvidia-pytriton's binary) serving model_repository/ with the demo
checkpoint on free ports, started once, waited for until ready (and warm), stopped by its PID at the end.

Every test module here is marked ``integration`` (``make test`` runs them). The server log goes to ``<pytest tmp>/triton/triton.log``.
"""

from __future__ import annotations

import io
import os

import pytest

from client import CaptionClient
from load_tests.testkit.servers import metric_sum, parse_metrics, running
from ofa_serving.launcher import TritonServer

READY_TIMEOUT_S = 600  # model load + warm-up on a busy 2-core machine


@pytest.fixture(scope="session")
def triton_server(demo_checkpoint, tmp_path_factory):
    """A running, ready :class:`TritonServer` (demo checkpoint, free ports); stopped by PID after the session."""
    log = tmp_path_factory.mktemp("triton") / "triton.log"
    server = TritonServer.on_free_ports(model_dir=demo_checkpoint, log_file=log, exit_timeout_secs=5)
    with running(server, READY_TIMEOUT_S, stop_timeout=15):
        pid = server.pid
        yield server
    with pytest.raises(ProcessLookupError):  # really gone: no zombie, no orphan holding the ports
        os.kill(pid, 0)


@pytest.fixture(scope="session")
def captioner(demo_checkpoint):
    """The engine in-process on the same checkpoint: the reference for what the server answers."""
    from ofa_captioning.captioner import Captioner

    return Captioner.from_pretrained(demo_checkpoint)


@pytest.fixture(scope="session")
def grpc_client(triton_server):
    with CaptionClient(triton_server.grpc_address, protocol="grpc", timeout=300) as client:
        yield client


@pytest.fixture(scope="session")
def http_client(triton_server):
    with CaptionClient(triton_server.http_url, timeout=300) as client:
        yield client


def metric(server: TritonServer, name: str, model: str) -> float:
    """The value of Prometheus metric ``name`` for ``model`` (version 1) on the server's metrics endpoint."""
    value = metric_sum(parse_metrics(server.metrics()), name, model=model, version="1")
    if value is None:
        raise AssertionError(f"metric {name} for {model} not found")
    return value


def decode_error(data: bytes) -> str:
    """The engine's own message for undecodable ``data`` (what the server must pass on to the client)."""
    from ofa_captioning.images import ImageDecodeError, load_image

    try:
        load_image(data)
    except ImageDecodeError as exc:
        return str(exc)
    raise AssertionError("decodable")


def distinct_images(count: int, start_seed: int = 1000) -> list[bytes]:
    """``count`` different small PNG images (distinct bytes, so the response cache never answers them)."""
    from load_tests.testkit.images import synthetic_rgb

    out = []
    for i in range(count):
        buffer = io.BytesIO()
        synthetic_rgb(480, 360 + i, seed=start_seed + i, text=f"#{i}").save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out
