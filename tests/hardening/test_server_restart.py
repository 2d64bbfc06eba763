"""A crashed tritonserver comes back: the supervisor of ``make serve`` and of the container image restarts it.

Against the real tritonserver 2.51 of the wheel (integration), the demo checkpoint, warm-up off, free ports:

* ``python -m ofa_serving.serve`` (what ``make serve`` runs): CVE-2025-23310/23311, one HTTP request with
  600,000 one-byte chunks, kills tritonserver with SIGSEGV; a SIGKILL (what the OOM killer sends) kills it too.
  Each time a new tritonserver is started on the same ports within 10 s, the crash is logged with its signal and
  counted in the state file, and a caption succeeds within 30 s of the crash. A requested stop (SIGTERM to
  ``serve``) ends with status 0 and nothing is restarted.
* ``python -m ofa_serving.supervisor tritonserver ...`` (the image's command) with a crash-loop limit of 2: the
  first SIGKILL is restarted, the second gives up: the process exits with 128 + 9 and leaves no server behind.

Without tritonserver (fast): the crash-loop window, exit descriptions, and :func:`run_supervised` driving a stand-in
server (a tiny HTTP server that answers readiness) through crashes, a crash loop and a requested stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from load_tests.reliabilitylib import caption_inputs, fire
from ofa_serving.launcher import TritonServer, free_ports
from ofa_serving.processes import child_processes, cmdline, is_running, shm_pools
from ofa_serving.supervisor import CrashLoop, describe_exit, exit_status

from .conftest import FAST, fresh_seed, png, wait_for

#: A crashed server's replacement must be running (a new process on the same ports) within this many seconds.
RESTART_BOUND_S = 10
#: ... and a caption must succeed within this many seconds of the crash (warm-up off).
CAPTION_BOUND_S = 30
READY_TIMEOUT_S = 600  # the first start: model load on a busy 2-core machine


# ----------------------------------------------------------------------------------------------- processes


def _children(parent: int, name: str) -> list[int]:
    """PIDs of the live children of ``parent`` whose program is called ``name``."""
    return [pid for pid, args in child_processes(parent) if args and args[0].endswith(name)]


@dataclass
class Supervised:
    """A supervising process (``serve`` or the supervisor's command line) and the tritonserver under it."""

    proc: subprocess.Popen
    log: Path
    state: Path
    http_port: int
    grpc_port: int

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def server_pid(self) -> int | None:
        pids = _children(self.proc.pid, "tritonserver")
        return pids[0] if len(pids) == 1 else None

    def counters(self) -> dict:
        return json.loads(self.state.read_text())

    def crash(self, pid: int, sig: signal.Signals | None = None) -> float:
        """Crash tritonserver ``pid`` (a signal, or the chunked request); the time it was gone."""
        what = f"tritonserver {pid} gone"
        if sig is None:
            _chunked_request(self.http_port)
            what += " (a tritonserver with CVE-2025-23310 fixed, 25.07 or newer, survives the request)"
        else:
            os.kill(pid, sig)
        wait_for(lambda: not is_running(pid), 60, what)
        return time.monotonic()

    def restarted(self, old: int, since: float) -> tuple[int, float]:
        """The new tritonserver's PID and how long after ``since`` it started (at most RESTART_BOUND_S)."""
        new = wait_for(lambda: (p := self.server_pid()) not in (None, old) and p, 30, "a new tritonserver")
        started = time.monotonic() - since
        assert started <= RESTART_BOUND_S, f"restarted {started:.1f} s after the crash\n{self.text()[-3000:]}"
        args = cmdline(new)
        assert f"--http-port={self.http_port}" in args  # the same ports
        return new, started

    def caption_within(self, since: float, bound: float = CAPTION_BOUND_S) -> float:
        """Seconds from ``since`` until a caption request succeeds (fails past ``bound``)."""
        seed = fresh_seed()
        last = None
        while time.monotonic() - since < bound:
            seed += 1
            (outcome,) = fire(
                f"127.0.0.1:{self.grpc_port}",
                [caption_inputs(grpcclient, [png(40, 30, seed)], **FAST)],
                timeout_s=max(bound - (time.monotonic() - since), 1),
            )
            if outcome.ok:
                return time.monotonic() - since
            last = outcome
            time.sleep(0.25)
        raise AssertionError(
            f"no caption within {bound} s of the crash (last: {last})\n{self.text()[-3000:]}"
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _chunked_request(port: int) -> None:
    """CVE-2025-23310/23311: an inference request whose body comes in 600,000 one-byte chunks (3.6 MB).

    tritonserver 2.51 decodes each chunk onto the stack (``alloca``) and dies with SIGSEGV; fixed in 25.07.
    """
    body = b"1\r\nx\r\n" * 600_000 + b"0\r\n\r\n"
    head = (
        "POST /v2/models/caption/infer HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(head + body)
            sock.recv(1024)  # nothing comes: the server is gone
        except OSError:
            pass  # reset by the dying server


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def _environment(
    base: Path, ports: list[int], environ: dict[str, str] | None = None, **extra: str
) -> dict[str, str]:
    """``environ`` (default: ours) with the test's settings and ``extra``."""
    http, grpc, metrics = ports
    env = dict(
        os.environ if environ is None else environ,
        HTTP_PORT=str(http),
        GRPC_PORT=str(grpc),
        METRICS_PORT=str(metrics),
        # a graceful stop waits for the work in flight: the supervisor's first probe of a restarted server without
        # warm-up can take seconds on a busy machine
        OFA_EXIT_TIMEOUT_SECS="30",
        OFA_WARMUP="0",  # a restarted server answers as soon as its models are loaded
        OFA_PROBE_INTERVAL_S="1",
        OFA_SUPERVISOR_STATE=str(base / "supervisor.json"),
        OFA_SUPERVISE="1",
    )
    env.update(extra)
    return env


def _wait_ready(sup: Supervised) -> None:
    url = f"http://127.0.0.1:{sup.http_port}"
    from ofa_serving.triton_api import TritonHttp

    deadline = time.monotonic() + READY_TIMEOUT_S
    while not TritonHttp(url).server_ready(2.0):
        assert sup.proc.poll() is None, sup.text()[-5000:]
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.5)
    wait_for(lambda: sup.state.exists(), 30, "the supervisor's state file")


# ----------------------------------------------------------------------------------------------- make serve


def start_supervised(
    base: Path, ports: list[int], module: list[str], env: dict[str, str], log: str
) -> Supervised:
    """``python -m <module...>`` (``ofa_serving.serve``, or ``ofa_serving.supervisor <command>`` as the image runs
    it) started in ``base`` with ``env`` on ``ports``; its output in ``base/<log>``. Not yet waited for."""
    path = base / log
    return Supervised(
        _start([sys.executable, "-m", *module], env, path), path, base / "supervisor.json", ports[0], ports[1]
    )


@contextlib.contextmanager
def serve_running(base: Path, checkpoint: Path, **extra: str):
    """``python -m ofa_serving.serve`` on free ports, supervised, ``checkpoint``, ready; ``extra`` environment.
    Yields the :class:`Supervised`; stops it and prints its ``[supervisor]`` lines afterwards."""
    ports = free_ports(3)
    env = _environment(base, ports, OFA_MODEL_DIR=str(checkpoint), **extra)
    sup = start_supervised(base, ports, ["ofa_serving.serve"], env, "serve.log")
    try:
        _wait_ready(sup)
        yield sup
    finally:
        sup.close()
        print(f"\n--- [supervisor] lines of serve ---\n{_supervisor_lines(sup.text())}")


@pytest.fixture(scope="module")
def served(demo_checkpoint, tmp_path_factory):
    """``python -m ofa_serving.serve`` on free ports, supervised, the demo checkpoint, ready."""
    with serve_running(tmp_path_factory.mktemp("serve-restart"), demo_checkpoint) as sup:
        yield sup


def _supervisor_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("[supervisor]"))


def _crash_and_recover(sup: Supervised, sig: signal.Signals | None, expected: str) -> None:
    before = sup.counters()
    old = wait_for(sup.server_pid, 30, "one tritonserver")
    pools = shm_pools(old)
    assert len(pools) == 2, pools  # preprocess and ofa
    crashed = sup.crash(old, sig)
    new, started = sup.restarted(old, crashed)
    assert not [p for p in pools if Path(p).exists()], "the dead server's shared memory was left behind"
    seconds = sup.caption_within(crashed)
    print(
        f"\n{expected}: a new tritonserver {started:.1f} s after the crash, a caption {seconds:.1f} s after it"
    )
    assert re.search(
        rf"\[supervisor\] tritonserver \(pid {old}\) {expected} while not asked to stop", sup.text()
    )
    after = wait_for(
        lambda: (c := sup.counters())["server_crashes"] > before["server_crashes"] and c, 10, "counted"
    )
    assert after["server_crashes"] == before["server_crashes"] + 1
    assert after["server_restarts"] == before["server_restarts"] + 1
    assert after["events"][-1]["reason"] == expected and after["events"][-1]["restarted"] is True
    assert not after["gave_up"] and sup.proc.poll() is None and sup.server_pid() == new


@pytest.mark.integration
def test_cve_2025_23310_chunked_request_crash_is_restarted(served):
    """CVE-2025-23310/23311 (HTTP chunked decoding, unauthenticated): 2.51 dies with SIGSEGV, and comes back."""
    _crash_and_recover(served, None, "killed by SIGSEGV")


@pytest.mark.integration
def test_a_killed_tritonserver_is_restarted(served):
    """SIGKILL: what the OOM killer sends."""
    _crash_and_recover(served, signal.SIGKILL, "killed by SIGKILL")


@pytest.mark.integration
def test_a_requested_stop_exits_cleanly_and_is_not_restarted(served):
    old = wait_for(served.server_pid, 30, "one tritonserver")
    crashes = served.counters()["server_crashes"]
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0, served.text()[-3000:]
    assert not is_running(old)
    assert served.counters()["server_crashes"] == crashes
    assert "started again" not in served.text().split("SIGTERM: stopping tritonserver")[-1]


# ----------------------------------------------------------------------------------------------- the image's command


@pytest.mark.integration
def test_the_image_command_restarts_then_gives_up_on_a_crash_loop(demo_checkpoint, tmp_path):
    """``python -m ofa_serving.supervisor tritonserver ...`` with OFA_MAX_SERVER_CRASHES=2: one restart, then exit
    non-zero, leaving no server behind."""
    ports = free_ports(3)
    launcher = TritonServer(
        model_dir=demo_checkpoint,
        http_port=ports[0],
        grpc_port=ports[1],
        metrics_port=ports[2],
        exit_timeout_secs=5,
    )
    # the launcher's server flags, under explicit model control as the image's CMD runs them; the supervisor
    # appends its restricted-API flags itself
    command = [
        arg
        for arg in launcher.command()
        if not arg.startswith(("--http-restricted-api", "--grpc-restricted-protocol", "--model-control-mode"))
    ] + ["--model-control-mode=explicit", "--load-model=*"]
    env = _environment(tmp_path, ports, launcher.environment(), OFA_MAX_SERVER_CRASHES="2")
    sup = start_supervised(tmp_path, ports, ["ofa_serving.supervisor", *command], env, "supervisor.log")
    try:
        _wait_ready(sup)
        first = wait_for(sup.server_pid, 30, "one tritonserver")
        crashed = sup.crash(first, signal.SIGKILL)
        second, _ = sup.restarted(first, crashed)
        # the second crash within the window (while it loads its models: a crash all the same) is a crash loop
        sup.crash(second, signal.SIGKILL)
        assert sup.proc.wait(30) == 128 + signal.SIGKILL, sup.text()[-3000:]
        assert "make a crash loop); giving up" in sup.text()
        assert _children(sup.proc.pid, "tritonserver") == []
        counters = sup.counters()
        assert counters["server_crashes"] == 2 and counters["gave_up"] is True
        assert [e["restarted"] for e in counters["events"] if e.get("server")] == [True, False]
    finally:
        sup.close()
        print(f"\n--- [supervisor] lines of the image's command ---\n{_supervisor_lines(sup.text())}")


# ----------------------------------------------------------------------------------------------- no tritonserver


def test_a_crash_loop_is_max_crashes_within_the_window():
    now = [0.0]
    loop = CrashLoop(max_crashes=3, window_s=100, clock=lambda: now[0])
    assert not loop.crashed()  # t=0
    now[0] = 60
    assert not loop.crashed()
    now[0] = 150  # the first one has left the window
    assert not loop.crashed() and loop.recent == 2
    now[0] = 155
    assert loop.crashed() and loop.recent == 3


def test_exits_are_described_with_their_signal_or_status():
    assert describe_exit(-11) == "killed by SIGSEGV" and exit_status(-11) == 139
    assert describe_exit(-9) == "killed by SIGKILL" and exit_status(-9) == 137
    assert describe_exit(1) == "exited with status 1" and exit_status(1) == 1


#: A stand-in for tritonserver: answers readiness and an empty repository index on ``--http-port``, exits 0 on
#: SIGTERM and 3 on SIGUSR1, and writes its PID to a file so that the test can kill it.
FAKE_SERVER = textwrap.dedent(
    """
    import http.server, os, signal, sys
    port = int(next(a for a in sys.argv if a.startswith("--http-port=")).split("=")[1])
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            body = b"[]"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_GET = do_POST = _answer
        def log_message(self, *args):
            pass
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    signal.signal(signal.SIGUSR1, lambda *a: os._exit(3))
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    with open(os.environ["FAKE_PID_FILE"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    server.serve_forever()
    """
)


@pytest.fixture
def fake_supervised(tmp_path):
    def start(**extra: str) -> tuple[Supervised, Path]:
        base = tmp_path / f"run{len(started)}"
        base.mkdir()
        script = base / "fake_tritonserver.py"
        script.write_text(FAKE_SERVER)
        pids = base / "pids"
        ports = free_ports(3)
        env = _environment(base, ports, FAKE_PID_FILE=str(pids), **extra)
        command = [sys.executable, str(script), f"--http-port={ports[0]}"]
        command += ["--model-control-mode=explicit", "--load-model=*"]
        sup = start_supervised(base, ports, ["ofa_serving.supervisor", *command], env, "supervisor.log")
        started.append(sup)
        _wait_ready(sup)
        return sup, pids

    started: list[Supervised] = []
    yield start
    for sup in started:
        sup.close()


def _pids(path: Path, count: int) -> list[int]:
    return wait_for(
        lambda: (p := [int(x) for x in path.read_text().split()]) and len(p) >= count and p, 20, "pids"
    )


def test_the_supervisor_restarts_a_crashed_server_until_a_crash_loop(fake_supervised):
    sup, pids = fake_supervised(OFA_MAX_SERVER_CRASHES="3")
    (first,) = _pids(pids, 1)
    os.kill(first, signal.SIGSEGV)
    second = _pids(pids, 2)[1]
    wait_for(lambda: "is ready again" in sup.text(), 20, "ready again")
    os.kill(second, signal.SIGUSR1)  # exits with status 3
    third = _pids(pids, 3)[2]
    wait_for(lambda: sup.text().count("is ready again") == 2, 20, "ready again")
    os.kill(third, signal.SIGKILL)
    assert sup.proc.wait(20) == 128 + signal.SIGKILL
    text = sup.text()
    assert (
        f"tritonserver (pid {first}) killed by SIGSEGV while not asked to stop (crash 1 within 300 s; 3 make"
        in text
    )
    assert (
        f"tritonserver (pid {second}) exited with status 3 while not asked to stop (crash 2 within 300 s; 3 make"
        in text
    )
    assert (
        f"tritonserver (pid {third}) killed by SIGKILL (crash 3 within 300 s; 3 make a crash loop); giving up"
        in text
    )
    counters = sup.counters()
    assert counters["server_crashes"] == 3 and counters["server_restarts"] == 2 and counters["gave_up"]


def test_an_exit_with_status_0_ends_supervision_and_a_requested_stop_is_not_restarted(fake_supervised):
    sup, pids = fake_supervised()
    (first,) = _pids(pids, 1)
    os.kill(first, signal.SIGTERM)  # not through the supervisor: exits 0 on its own ...
    assert sup.proc.wait(20) == 0  # ... and the supervisor stops too
    assert "exited with status 0 without being asked to" in sup.text()

    sup, pids = fake_supervised()
    (first,) = _pids(pids, 1)
    sup.proc.send_signal(signal.SIGTERM)  # a requested stop: forwarded, not restarted
    assert sup.proc.wait(20) == 0
    assert len(_pids(pids, 1)) == 1 and "restarting" not in sup.text()
    assert sup.counters()["server_crashes"] == 0
