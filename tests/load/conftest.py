"""Fixtures of the load-test tests: the load_tests/ modules on sys.path and a real server for the smoke run.

``load_server`` starts the real tritonserver (``ofa_serving``'s launcher, demo checkpoint, free ports) once per
session for the Locust smoke test. The integration tests' own server fixture lives in tests/integration/ and is
not visible here; a separate server keeps the smoke test independent of their traffic, which matters because
it compares Locust's request count with the server's metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

LOAD_TESTS = Path(__file__).resolve().parents[2] / "load_tests"
if str(LOAD_TESTS) not in sys.path:
    sys.path.insert(0, str(LOAD_TESTS))


@pytest.fixture(scope="session")
def load_server(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A ready tritonserver on free 127.0.0.1 ports serving the demo checkpoint; stopped after the session."""
    from loadlib import ensure_server

    from ofa_serving.launcher import free_ports

    http_port, grpc_port, metrics_port = free_ports(3)
    log_file = tmp_path_factory.mktemp("load-server") / "tritonserver.log"
    with ensure_server(
        "127.0.0.1", http_port, grpc_port, metrics_port, model_dir=demo_checkpoint, log_file=log_file
    ) as server:
        assert server.started, "a server already answered on ports that were free a moment ago"
        yield server
