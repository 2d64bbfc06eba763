"""Healing (issue 10): a dead, frozen or poisoned model comes back without a person; the shipped probe sees it.

The ``healing`` server runs the committed repository under supervision (:mod:`ofa_serving.supervisor`, as
``make serve`` and the container image run it), except that ``ofa/1/model.py`` is the test-only
``faulty_ofa.py`` (the committed adapter plus a fault hook) and warm-up is off (faster reloads on 2 CPU cores). The
supervisor probes every second here (5 s by default).

* SIGKILL of the ``ofa`` stub, SIGKILL of the ``preprocess`` stub, SIGSTOP of the ``ofa`` stub, each while 4
  clients send requests: the service comes back; the failed requests of the outage are printed, and bounded.
* An engine that fails every batch (the fault hook): the model unloads itself (readiness false), the supervisor
  loads it in a fresh stub; the clients' INTERNAL errors carry an id, not the exception text.
* The probe command of the Kubernetes livenessProbe and of the Dockerfile HEALTHCHECK, read from those files and
  run as written: exit 0 on the healthy server, non-zero within its timeout once a stub is dead.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import yaml

from load_tests.reliabilitylib import Outcome, caption_inputs, fire
from ofa_serving.launcher import TritonServer, default_model_repository
from ofa_serving.probe import probe_server
from ofa_serving.processes import stub_pids
from ofa_serving.supervisor import Supervisor, new_admin_key

from .conftest import FAST, fresh_seed, png, supervised, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLIENTS = 4
BACKOFF_S = 0.25  # a client waits this long after a failed request before the next
#: Generous bound on the whole outage (kill -> first caption): a reload loads the checkpoint in a new process,
#: seconds on a quiet 2-core machine, tens of seconds while other test runs share it.
OUTAGE_BOUND_S = 120
#: The clients' settings: the cheapest engine work, the request path is the same.
CHEAP = {"beam_size": 1, "max_length": 1}


@dataclass
class Healing:
    server: TritonServer
    supervisor: Supervisor
    poison: Path
    log_lines: list[str] = field(default_factory=list)

    def triton_log(self) -> str:
        return self.server.log_file.read_text(errors="replace")


@pytest.fixture(scope="module")
def healing(demo_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("healing")
    repository = base / "model_repository"
    shutil.copytree(default_model_repository(), repository, ignore=shutil.ignore_patterns("__pycache__"))
    version = repository / "ofa" / "1"
    (version / "model.py").rename(version / "committed_model.py")
    shutil.copy(Path(__file__).with_name("faulty_ofa.py"), version / "model.py")
    poison = base / "poisoned-pid"
    key = new_admin_key()
    server = TritonServer.on_free_ports(
        repository,
        demo_checkpoint,
        log_file=base / "triton.log",
        exit_timeout_secs=5,
        admin_key=key,
        env={"OFA_WARMUP": "0", "OFA_TEST_POISON_FILE": str(poison)},
    )
    with supervised(server, base) as (supervisor, lines):
        yield Healing(server, supervisor, poison, lines)


class Clients:
    """``count`` closed-loop clients, each sending one distinct one-image request at a time over gRPC (no
    retries); after a failure a client waits :data:`BACKOFF_S`. ``records``: (sent, answered, outcome)."""

    def __init__(self, server: TritonServer, count: int = CLIENTS) -> None:
        self.server, self.count = server, count
        self.records: list[tuple[float, float, Outcome]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]

    def _run(self, index: int) -> None:
        seed = fresh_seed() + 100_000 * index
        while not self._stop.is_set():
            seed += 1
            sent = time.monotonic()
            (outcome,) = fire(
                self.server.grpc_address,
                [caption_inputs(grpcclient, [png(44, 33, seed)], **CHEAP)],
                timeout_s=300,
            )
            with self._lock:
                self.records.append((sent, time.monotonic(), outcome))
            if not outcome.ok:
                time.sleep(BACKOFF_S)

    def answered_since(self, since: float) -> list[Outcome]:
        with self._lock:
            return [o for sent, _done, o in self.records if sent > since and o.ok]

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=300)


def _outage(healing: Healing, model: str, sig: signal.Signals) -> None:
    server, supervisor = healing.server, healing.supervisor
    (victim,) = stub_pids(server.pid, model)
    heals = supervisor.heals[model]
    with Clients(server) as clients:
        wait_for(lambda: len(clients.answered_since(0)) >= CLIENTS, 120, "the clients get captions")
        os.kill(victim, sig)
        hit = time.monotonic()
        # recovered: a request sent after the fault was captioned by a new stub
        wait_for(
            lambda: clients.answered_since(hit) and stub_pids(server.pid, model) not in ([], [victim]),
            OUTAGE_BOUND_S,
            f"{model} answers again after {sig.name}",
        )
        recovered = time.monotonic()
    # (leaving the block waits for the requests in flight: sent after the recovery, they must all be answered)
    outage = recovered - hit
    failed = [(sent, done, o) for sent, done, o in clients.records if not o.ok]
    kinds = sorted({o.message.split(":")[0][:80] for _s, _d, o in failed})
    print(
        f"\n{sig.name} {model}: service back {outage:.1f} s after the fault; {len(failed)} failed requests "
        f"(of {len(clients.records)}) from {CLIENTS} clients meanwhile: {kinds}"
    )
    assert victim not in stub_pids(server.pid, model)
    assert supervisor.heals[model] == heals + 1, supervisor.events
    assert any(f"{model}: healed in" in line for line in healing.log_lines)
    # the failures belong to the outage: answered between the fault and the recovery, none after
    assert all(hit - 1 <= done <= recovered + 1 for _s, done, _o in failed), failed
    assert not [o for sent, _d, o in clients.records if sent > recovered and not o.ok]
    # each client fails at most once per backoff interval of the outage (fast errors, no pile-up, no hang)
    assert len(failed) <= CLIENTS * (outage / BACKOFF_S + 2)
    assert all(o.status != "NO_ANSWER" for _s, _d, o in failed)


def test_a_killed_ofa_stub_is_healed_under_load(healing):
    _outage(healing, "ofa", signal.SIGKILL)


def test_a_killed_preprocess_stub_is_healed_under_load(healing):
    _outage(healing, "preprocess", signal.SIGKILL)


def test_a_frozen_ofa_stub_is_healed_under_load(healing):
    _outage(healing, "ofa", signal.SIGSTOP)


def _index(healing: Healing) -> dict[str, str]:
    from ofa_serving.probe import list_models

    return list_models(healing.server.http_url, headers=healing.supervisor.headers)


def _ready(server: TritonServer) -> bool:
    return server.is_ready()


def test_an_engine_failing_every_batch_unloads_its_model_and_is_healed(healing):
    server, supervisor = healing.server, healing.supervisor
    supervisor.pause()  # first see what the model does on its own
    try:
        (pid,) = stub_pids(server.pid, "ofa")
        healing.poison.write_text(str(pid))
        heals = supervisor.heals["ofa"]
        failures = []
        for i in range(3):
            (outcome,) = fire(
                server.grpc_address, [caption_inputs(grpcclient, [png(40, 30, fresh_seed() + i)], **FAST)]
            )
            failures.append(outcome)
        for outcome in failures:
            assert outcome.status == "StatusCode.INTERNAL", outcome
            match = re.search(
                r"ofa: internal error, id ([0-9a-f]{16}) \(details in the server log\)", outcome.message
            )
            assert match, outcome.message
            assert "illegal memory access" not in outcome.message and "Error" not in outcome.message
            assert re.search(
                rf"internal error, id {match.group(1)}:[^\n]*illegal memory access", healing.triton_log()
            )
        # the model took itself out: unloaded, so the server is no longer ready
        wait_for(lambda: _index(healing).get("ofa") != "READY", 60, "ofa unloads itself")
        assert not _ready(server)
        assert "ofa: the engine failed 3 batches in a row; unloading the model" in healing.triton_log()
    finally:
        supervisor.resume()
    wait_for(lambda: supervisor.heals["ofa"] == heals + 1, OUTAGE_BOUND_S, "the supervisor reloads ofa")
    wait_for(lambda: _ready(server), 60, "ready again")
    assert stub_pids(server.pid, "ofa") != [pid]
    (outcome,) = fire(server.grpc_address, [caption_inputs(grpcclient, [png(40, 30, fresh_seed())], **FAST)])
    assert outcome.ok, outcome
    print(f"\n{supervisor.events[-1]}")


# -- the shipped probe command ----------------------------------------------------------------------------


def shipped_probe_commands() -> dict[str, list[str]]:
    """The liveness command of docker/k8s/deployment.yaml and the HEALTHCHECK command of docker/Dockerfile."""
    docs = [d for d in yaml.safe_load_all((REPO / "docker" / "k8s" / "deployment.yaml").read_text()) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "triton"]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    (healthcheck,) = re.findall(r"^HEALTHCHECK .*$", dockerfile, re.MULTILINE)
    command = healthcheck.split(" CMD ", 1)[1].strip()
    return {
        "kubernetes livenessProbe": container["livenessProbe"]["exec"]["command"],
        "Dockerfile HEALTHCHECK": json.loads(command) if command.startswith("[") else ["sh", "-c", command],
    }


def probe_timeout(command: list[str]) -> float:
    text = " ".join(command)
    match = re.search(r"--timeout[ =](\d+(?:\.\d+)?)", text)
    return float(match.group(1)) if match else 20.0


def _run_probe(command: list[str], server: TritonServer) -> tuple[int, float, str]:
    # As the container runs it: `python3` is the Python with the packages (here: this venv's), HTTP_PORT is the
    # server's port (8000 in the image).
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["HTTP_PORT"] = str(server.http_port)
    start = time.monotonic()
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=probe_timeout(command) + 60
    )
    return result.returncode, time.monotonic() - start, result.stdout + result.stderr


def test_the_shipped_probe_command_fails_on_a_dead_stub(healing):
    commands = shipped_probe_commands()
    assert commands["kubernetes livenessProbe"] == commands["Dockerfile HEALTHCHECK"], "one probe command"
    server, supervisor = healing.server, healing.supervisor
    # healthy, and warm: a model just reloaded without warm-up (an earlier test) answers its first call slowly here
    wait_for(
        lambda: probe_server(server.http_url, timeout=120, headers=server.admin_headers).ok,
        300,
        "the server answers every probe",
    )
    for name, command in commands.items():
        # a healthy server passes (up to 3 tries: on this shared 2-core machine one beam-1 call took over 20 s)
        for _attempt in range(3):
            code, seconds, output = _run_probe(command, server)
            print(
                f"\n{name} ({shlex.join(command)}) on the healthy server: exit {code} in {seconds:.1f} s\n{output}"
            )
            if code == 0:
                break
        assert code == 0, output
    supervisor.pause()
    try:
        heals = supervisor.heals["preprocess"]
        (pid,) = stub_pids(server.pid, "preprocess")
        os.kill(pid, signal.SIGKILL)
        for name, command in commands.items():
            code, seconds, output = _run_probe(command, server)
            print(f"{name} with the preprocess stub dead: exit {code} in {seconds:.1f} s\n{output}")
            assert code != 0, output
            assert "preprocess: error" in output and "not healthy" in output
            assert seconds <= probe_timeout(command) + 10  # its own bound, plus Python's start-up
    finally:
        supervisor.resume()
    wait_for(
        lambda: supervisor.heals["preprocess"] == heals + 1,
        OUTAGE_BOUND_S,
        "the supervisor reloads preprocess",
    )
    code, _seconds, output = _run_probe(commands["kubernetes livenessProbe"], server)
    assert code == 0, output


def test_clients_cannot_load_or_unload_models(healing):
    """The model-repository API is the supervisor's alone: no header, no load/unload (HTTP 403, gRPC refused)."""
    server = healing.server
    for action in ("unload", "load"):
        request = urllib.request.Request(
            f"{server.http_url}/v2/repository/models/ofa/{action}", data=b"{}", method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403
        assert "This API is restricted" in refused.value.read().decode()
    client = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        with pytest.raises(Exception, match="This protocol is restricted"):
            client.unload_model("ofa")
        with pytest.raises(Exception, match="This protocol is restricted"):
            client.get_model_repository_index()
    finally:
        client.close()
    assert _index(healing)["ofa"] == "READY"
