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
    from load_tests.loadlib import ServerHandle
    from load_tests.testkit.servers import running
    from ofa_serving.launcher import TritonServer

    try:
        shared = request.getfixturevalue("triton_server")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        yield ServerHandle.of(shared, started=False)
        return
    log_file = tmp_path_factory.mktemp("load-server") / "tritonserver.log"
    server = TritonServer.on_free_ports(model_dir=demo_checkpoint, log_file=log_file)
    with running(server):
        yield ServerHandle.of(server)
