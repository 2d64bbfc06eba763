"""Faults during load (issue 5, hardening): the ``ofa`` stub process killed; SIGTERM to the server.

What tritonserver 2.51 does when the ``ofa`` Python backend stub dies (SIGKILL, OOM killer, segfault), as
observed and asserted here (docs/reliability.md):

* requests in flight and every later request to ``ofa`` fail at once with INTERNAL "Stub process 'ofa_0_0' is
  not healthy." (no hang), counted in ``nv_inference_request_failure{model="ofa",reason="BACKEND"}``;
* the Python backend does **not** restart the stub, and the server and the model keep reporting **ready**: the
  health endpoints do not see it (nothing is written to the log either);
* ``preprocess`` is unaffected;
* the failure is detected by the deep probe (``ofa_serving.probe``, the image's HEALTHCHECK and Kubernetes
  liveness command); without the supervisor (this server runs without one, ``test_healing.py`` with one) the
  recovery is a restart of the server, after which it captions again.

SIGTERM during load: the requests in flight are completed (graceful drain, ``--exit-timeout-secs``), new ones are
refused with UNAVAILABLE, readiness turns false, and the process exits with status 0 and frees its ports.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from load_tests.reliabilitylib import caption_inputs, fire
from ofa_serving.launcher import TritonServer
from ofa_serving.probe import probe_server
from ofa_serving.processes import is_running, stub_shm_pool

from .conftest import (
    FAST,
    fresh_seed,
    model_metric,
    models_ready,
    png,
    stub_pid_by_model,
    wait_until_preprocessed,
)

pytestmark = pytest.mark.integration

IN_FLIGHT = 4  # within the small queues of queue_server: none is refused
NOT_HEALTHY = "Stub process 'ofa_0_0' is not healthy."


def _load_in_background(server: TritonServer, count: int) -> tuple[threading.Thread, list]:
    """``count`` distinct one-image requests fired at once from a thread; returns (thread, outcomes list)."""
    seed = fresh_seed()
    requests = [caption_inputs(grpcclient, [png(56, 42, seed=seed + i)], **FAST) for i in range(count)]
    outcomes: list = []
    thread = threading.Thread(
        target=lambda: outcomes.extend(fire(server.grpc_address, requests, timeout_s=240))
    )
    thread.start()
    return thread, outcomes


def _shm_region(pid: int) -> Path | None:
    """The /dev/shm file of a stub's shared-memory pool (named on its command line)."""
    pools = stub_shm_pool(pid)
    return Path(pools.pop()) if pools else None


def _one_caption(server: TritonServer):
    (outcome,) = fire(
        server.grpc_address, [caption_inputs(grpcclient, [png(52, 38, seed=fresh_seed())], **FAST)]
    )
    return outcome


def test_ofa_stub_killed_during_load_fails_requests_fast_and_a_restart_recovers(queue_server):
    server = queue_server.get()
    stubs = stub_pid_by_model(server)
    assert probe_server(server.http_url, headers=server.admin_headers).ok
    backend_failures = model_metric(
        server, "nv_inference_request_failure", "ofa", settled=True, reason="BACKEND"
    )
    preprocessed = model_metric(server, "nv_inference_request_success", "preprocess", settled=True)

    region = _shm_region(stubs["ofa"])  # the stub's shared-memory pool in /dev/shm
    thread, outcomes = _load_in_background(server, IN_FLIGHT)
    wait_until_preprocessed(server, preprocessed, IN_FLIGHT)
    time.sleep(0.3)  # inside ofa's execute() (a batch of 4 takes seconds on a CPU)
    os.kill(stubs["ofa"], signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(timeout=120)
    assert not thread.is_alive() and len(outcomes) == IN_FLIGHT

    # in flight: failed at once with the stub error (or answered just before the kill); never a hang
    assert all(o.ok or (o.status == "StatusCode.INTERNAL" and NOT_HEALTHY in o.message) for o in outcomes), (
        outcomes
    )
    assert any(not o.ok for o in outcomes), "the kill came after the batch: nothing was in flight"
    answered_after = time.monotonic() - killed_at
    print(f"\nin-flight requests failed {answered_after:.1f} s after the kill")
    assert answered_after < 30

    # Triton 2.51: no restart of the stub, and the health endpoints still say ready
    deadline = time.monotonic() + 30
    while is_running(stubs["ofa"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (
        "ofa" not in stub_pid_by_model(server)
        and stub_pid_by_model(server)["preprocess"] == stubs["preprocess"]
    )
    assert models_ready(server) == dict.fromkeys(["server", "caption", "preprocess", "ofa"], True), (
        "Triton now reports the dead stub: update docs/reliability.md (stub failure) and this test"
    )
    for _ in range(2):
        later = _one_caption(server)
        assert later.status == "StatusCode.INTERNAL" and NOT_HEALTHY in later.message, later
        assert later.latency_s < 10
        time.sleep(1)
    assert "ofa" not in stub_pid_by_model(server), (
        "Triton restarted the stub: update docs/reliability.md and this test"
    )

    # preprocess still answers; the failures are counted; the liveness check sees the dead stub
    (bad,) = fire(server.grpc_address, [caption_inputs(grpcclient, [b"not an image"], **FAST)])
    assert bad.status == "StatusCode.INVALID_ARGUMENT"
    assert (
        model_metric(server, "nv_inference_request_failure", "ofa", reason="BACKEND") >= backend_failures + 2
    )
    probe = probe_server(server.http_url, headers=server.admin_headers)
    assert not probe.ok and [c.model for c in probe.checks if not c.ok] == ["ofa"], probe.lines()

    # recovery without a supervisor: restart the server (what the liveness probe makes Kubernetes do)
    server = queue_server.restart()
    if region is not None and region.exists():  # 2.51 leaves the killed stub's pool behind: tidy up
        print(f"\n{region} was left behind by the killed stub ({region.stat().st_size} bytes); removed")
        region.unlink()
    assert probe_server(server.http_url, headers=server.admin_headers).ok
    assert stub_pid_by_model(server)["ofa"] != stubs["ofa"]
    recovered = _one_caption(server)
    assert recovered.ok, recovered


def test_sigterm_during_load_completes_in_flight_requests_then_exits(queue_server):
    server = queue_server.get()
    preprocessed = model_metric(server, "nv_inference_request_success", "preprocess", settled=True)
    submitted_at = time.monotonic()
    thread, outcomes = _load_in_background(server, IN_FLIGHT)
    wait_until_preprocessed(server, preprocessed, IN_FLIGHT, poll=0.01)
    server.terminate()  # SIGTERM, as docker stop / Kubernetes / Ctrl-C of make serve send it
    terminated_at = time.monotonic()
    time.sleep(0.5)
    late = _one_caption(server)  # "Server is stopping" (or, once gone, unreachable)
    assert late.status == "StatusCode.UNAVAILABLE", late
    client = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        ready = client.is_server_ready()
    except Exception:  # noqa: BLE001 - "Server exiting" (UNAVAILABLE) counts as not ready
        ready = False
    finally:
        client.close()
    assert not ready

    thread.join(timeout=server.exit_timeout_secs + 30)
    assert len(outcomes) == IN_FLIGHT
    assert all(o.ok for o in outcomes), f"a request in flight at SIGTERM was not completed: {outcomes}"
    last_answer = max(o.latency_s for o in outcomes)
    # they were in flight: answered after the signal (a batch of 4 takes seconds on a CPU)
    assert submitted_at + min(o.latency_s for o in outcomes) > terminated_at, "answered before the SIGTERM"

    code = server.process.wait(timeout=server.exit_timeout_secs + 15)
    exited_after = time.monotonic() - terminated_at
    assert code == 0, f"tritonserver exited with {code} (exit timeout {server.exit_timeout_secs} s hit?)"
    assert exited_after < server.exit_timeout_secs, (
        "it waited for the whole exit timeout instead of the drain"
    )
    print(
        f"\nSIGTERM {terminated_at - submitted_at:.1f} s after the requests; in-flight requests answered "
        f"{submitted_at + last_answer - terminated_at:.1f} s after SIGTERM; exit (status 0) after {exited_after:.1f} s"
    )
    # a new server may listen on the ports now (SO_REUSEADDR as servers set it: TIME_WAIT is fine)
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
