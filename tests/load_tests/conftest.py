"""Fixtures of the load-test tests: a real server for the smoke run.

``load_server`` is the session's ``triton_server`` fixture where one is visible from here (tests/integration's
fixture is not, by pytest's conftest scoping, unless it moves to tests/conftest.py); otherwise it starts its own
real tritonserver (``ofa_serving``'s launcher, demo checkpoint, free 127.0.0.1 ports) once per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def load_server(
    request: pytest.FixtureRequest, demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
):
    """A ready tritonserver serving the demo checkpoint, as a ``loadlib.ServerHandle``."""
    from load_tests.loadlib import ServerHandle, ensure_server
    from ofa_serving.launcher import free_ports

    try:
        shared = request.getfixturevalue("triton_server")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        host = "127.0.0.1" if shared.host in ("", "0.0.0.0") else shared.host
        yield ServerHandle(host, shared.http_port, shared.grpc_port, shared.metrics_port, started=False)
        return
    http_port, grpc_port, metrics_port = free_ports(3)
    log_file = tmp_path_factory.mktemp("load-server") / "tritonserver.log"
    with ensure_server(
        "127.0.0.1", http_port, grpc_port, metrics_port, model_dir=demo_checkpoint, log_file=log_file
    ) as server:
        assert server.started, "a server already answered on ports that were free a moment ago"
        yield server
