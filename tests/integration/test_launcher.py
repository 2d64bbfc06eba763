"""The launcher against the real binary: early exits are reported with the log, `make serve`'s entry point
starts, prints how to call it and stops cleanly on SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from load_tests.reliabilitylib import server_pid_on_port
from ofa_serving.launcher import ServerStartError, TritonServer, free_ports

pytestmark = pytest.mark.integration


def test_a_broken_model_repository_fails_fast_with_the_log(tmp_path):
    (tmp_path / "repo" / "broken" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "broken" / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: -3\n')
    server = TritonServer.on_free_ports(tmp_path / "repo", log_file=tmp_path / "log.txt", exit_timeout_secs=1)
    server.start()
    try:
        with pytest.raises(ServerStartError, match=r"exited with code \d+ before ready(.|\n)*broken"):
            server.wait_ready(timeout=120)
    finally:
        server.stop(timeout=5)


def test_serve_entry_point_runs_in_the_foreground_and_stops_on_sigint(demo_checkpoint, tmp_path):
    http, grpc, metrics = free_ports(3)
    env = dict(
        os.environ,
        OFA_MODEL_DIR=str(demo_checkpoint),
        HTTP_PORT=str(http),
        GRPC_PORT=str(grpc),
        METRICS_PORT=str(metrics),
        OFA_EXIT_TIMEOUT_SECS="5",
        OFA_WARMUP="false",
    )
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ofa_serving.serve"], env=env, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 600
            while "is ready" not in log.read_text(errors="replace"):
                assert proc.poll() is None, log.read_text(errors="replace")
                assert time.monotonic() < deadline, "not ready in time"
                time.sleep(0.5)
            text = log.read_text()
            assert f"127.0.0.1:{grpc}" in text and "python -m client caption" in text and "curl" in text
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0, log.read_text(errors="replace")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_serve_refuses_a_non_loopback_host_before_tritonserver_starts(tmp_path):
    """The wheel's Triton 2.51 has unfixed CVEs: `make serve` with HOST=0.0.0.0 exits non-zero at once, naming
    them and the fix, and no tritonserver ever runs on its ports."""
    http, grpc, metrics = free_ports(3)
    env = dict(
        os.environ,
        HOST="0.0.0.0",
        HTTP_PORT=str(http),
        GRPC_PORT=str(grpc),
        METRICS_PORT=str(metrics),
        OFA_DOWNLOAD="0",
        DEMO_CHECKPOINT=str(tmp_path / "never-built"),
    )
    env.pop("OFA_ALLOW_UNPATCHED_TRITON", None)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ofa_serving.serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "refusing to serve Triton 2.51.0" in result.stderr
    assert "CVE-2025-23310" in result.stderr and "CVE-2025-23319" in result.stderr
    assert "docker/" in result.stderr and "OFA_ALLOW_UNPATCHED_TRITON=1" in result.stderr
    assert "starting tritonserver" not in result.stderr
    assert not (tmp_path / "never-built").exists()  # not even the demo checkpoint was prepared
    assert server_pid_on_port(http) is None and time.monotonic() - start < 60
