"""Nothing lost for a caller: a heal, a restart and a graceful drain under load, seen through ``CaptionClient``.

Against the real tritonserver 2.51 of the wheel (integration), the demo checkpoint, warm-up off, free ports. One
``python -m ofa_serving.serve`` (what ``make serve`` runs: tritonserver under the supervisor, probes every second)
serves three tests in turn while 4 threads caption distinct images continuously (2 over gRPC, 2 over HTTP):

* SIGKILL of the ``ofa`` stub: the supervisor heals it; no call fails, each within its deadline, retries > 0;
* SIGKILL of tritonserver: the supervisor starts it again; the same;
* SIGTERM to ``serve`` (clients without retries): the requests the server had accepted are answered, a request
  sent once readiness is false is refused at once (UNAVAILABLE, no hang) and the same request is answered by a
  second server (``hardened_server``: what a client retrying behind a load balancer reaches); ``serve`` exits 0
  within the exit timeout, and nothing is healed or restarted after the signal.

Plus: an INVALID_ARGUMENT request is sent once (the server counts one failure, the client no retry), and, without
tritonserver, the image's command (``python -m ofa_serving.supervisor``) forwards SIGTERM at once and heals nothing
while its server drains. Each test prints its figures (calls, failures, retries, longest call):
docs/reliability.md quotes them.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from client import CaptionClient, CaptionError, InvalidInputError, ServerUnavailableError
from ofa_serving.launcher import free_ports
from ofa_serving.processes import stub_pids
from ofa_serving.triton_api import TritonHttp

from .conftest import FAST, fresh_seed, model_metric, png, wait_for
from .test_server_restart import (
    Supervised,
    _environment,
    _wait_ready,
    serve_running,
    start_supervised,
)

#: Total seconds one call may take, all attempts included (rides out a heal, ~5 s, and a restart, 10-20 s).
DEADLINE_S = 60.0
#: A request refused by a draining (or stopped) server fails within this many seconds.
REFUSED_BOUND_S = 5.0
#: A call in flight this long has reached the server (loopback): the drain must answer it.
ACCEPTED_AFTER_S = 0.5
#: Calls completed after the heal or the restart before the load stops: the service is back for every client.
CALLS_AFTER = 8
OUTAGE_BOUND_S = 180  # kill -> healed / ready again, on a busy 2-core machine
PROTOCOLS = ("grpc", "http", "grpc", "http")
#: OFA_EXIT_TIMEOUT_SECS of the ``serving`` fixture (test_server_restart's environment), and the seconds tritonserver
#: may take after it to unload its models and exit.
EXIT_TIMEOUT_S, UNLOAD_MARGIN_S = 30, 10


@dataclass
class Call:
    """One ``caption()`` call of a load thread: when, how long, how it ended; ``retried_on`` the fallback server
    when it is the same image sent there after a refusal."""

    protocol: str
    start: float
    end: float
    error: CaptionError | None = None
    retried_on: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Traffic:
    """4 threads (2 gRPC, 2 HTTP) captioning distinct images through :class:`CaptionClient` until :meth:`stop`.

    ``options`` go to the clients (e.g. ``retries=0``). With ``fallback`` (``{"grpc": address, "http": url}``), a
    thread whose call fails sends the same image there once and ends: a client retrying on another replica.
    """

    def __init__(self, grpc: str, http: str, fallback: dict[str, str] | None = None, **options) -> None:
        options.setdefault("deadline", DEADLINE_S)
        self.clients = {"grpc": CaptionClient(grpc, **options), "http": CaptionClient(http, **options)}
        self.fallback = {p: CaptionClient(u, retries=0) for p, u in (fallback or {}).items()}
        self.calls: list[Call] = []
        self.in_flight: dict[int, float] = {}  # thread -> start of its current call
        self._seeds = itertools.count(fresh_seed())
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(i, p), daemon=True) for i, p in enumerate(PROTOCOLS)
        ]

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.close()

    def close(self) -> None:
        """Close the clients' connections."""
        for client in (*self.clients.values(), *self.fallback.values()):
            client.close()

    def _call(self, client: CaptionClient, protocol: str, image: bytes, retried_on: str = "") -> Call:
        start = time.monotonic()
        error = None
        try:
            assert client.caption(image, **FAST).text is not None
        except CaptionError as exc:
            error = exc
        call = Call(protocol, start, time.monotonic(), error, retried_on)
        with self._lock:
            self.calls.append(call)
        return call

    def _run(self, index: int, protocol: str) -> None:
        while not self._stop.is_set():
            image = png(40, 30, next(self._seeds))
            self.in_flight[index] = time.monotonic()
            call = self._call(self.clients[protocol], protocol, image)
            del self.in_flight[index]
            if call.error is not None and self.fallback:
                self._call(self.fallback[protocol], protocol, image, retried_on="fallback")
                return

    def stop(self) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(DEADLINE_S + 30)
        assert not any(t.is_alive() for t in self.threads), "a call outlived its deadline"

    def done_after(self, since: float) -> int:
        """Calls answered (successfully) that started after ``since``."""
        with self._lock:
            return sum(1 for c in self.calls if c.start > since and c.error is None)

    @property
    def retries(self) -> int:
        return sum(c.retry_count for c in self.clients.values())

    def figures(self, what: str) -> dict:
        """Calls, failures, retries, longest call (of the primary server's calls); printed."""
        with self._lock:
            calls = [c for c in self.calls if not c.retried_on]
        out = {
            "calls": len(calls),
            "failures": sum(1 for c in calls if c.error is not None),
            "retries": self.retries,
            "longest_s": round(max((c.seconds for c in calls), default=0.0), 1),
        }
        print(
            f"\n{what}: {out['calls']} calls, {out['failures']} failed, {out['retries']} retries, "
            f"longest call {out['longest_s']:.1f} s"
        )
        return out


@pytest.fixture(scope="module")
def serving(demo_checkpoint, tmp_path_factory):
    """``python -m ofa_serving.serve`` on free ports, supervised (probes every second), warm-up off, ready."""
    base = tmp_path_factory.mktemp("no-lost-calls")
    with serve_running(base, demo_checkpoint, OFA_EXIT_TIMEOUT_SECS=str(EXIT_TIMEOUT_S)) as sup:
        yield sup


def _addresses(sup: Supervised) -> tuple[str, str]:
    return f"127.0.0.1:{sup.grpc_port}", f"http://127.0.0.1:{sup.http_port}"


def _assert_nothing_lost(traffic: Traffic, figures: dict) -> None:
    failed = [c for c in traffic.calls if c.error is not None]
    assert not failed, [f"{c.protocol}: {type(c.error).__name__}: {c.error}" for c in failed[:5]]
    assert figures["calls"] > 0 and figures["longest_s"] <= DEADLINE_S + 1
    assert {c.protocol for c in traffic.calls} == {"grpc", "http"}
    assert figures["retries"] > 0, "the outage was not seen by any call: the test proves nothing"


def _kill_under_load(serving, pid, marker, event, title):
    """SIGKILL pid under mixed-protocol load, wait for `marker` in the log, then check no call was lost."""
    grpc, http = _addresses(serving)
    with Traffic(grpc, http) as traffic:
        wait_for(lambda: traffic.done_after(0) >= 4, 120, "captions before the kill")
        seen = serving.text().count(marker)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: serving.text().count(marker) > seen, OUTAGE_BOUND_S, f"the {event}")
        back = time.monotonic()
        wait_for(lambda: traffic.done_after(back) >= CALLS_AFTER, 120, f"captions after the {event}")
    _assert_nothing_lost(traffic, traffic.figures(title.format(back - killed)))


@pytest.mark.integration
def test_a_heal_under_load_loses_no_call(serving):
    server = wait_for(serving.server_pid, 30, "one tritonserver")
    (stub,) = stub_pids(server, "ofa")
    _kill_under_load(
        serving, stub, "ofa: healed in", "heal", "heal (ofa stub SIGKILLed, healed {:.1f} s later)"
    )


@pytest.mark.integration
def test_a_tritonserver_restart_under_load_loses_no_call(serving):
    old = wait_for(serving.server_pid, 30, "one tritonserver")
    _kill_under_load(
        serving,
        old,
        "is ready again",
        "restart",
        "restart (tritonserver SIGKILLed, ready again {:.1f} s later)",
    )
    assert serving.server_pid() not in (None, old)


@pytest.mark.integration
def test_sigterm_under_load_answers_accepted_calls_and_refuses_new_ones_fast(serving, hardened_server):
    grpc, http = _addresses(serving)
    second = {"grpc": hardened_server.grpc_address, "http": hardened_server.http_url}
    with Traffic(grpc, http, fallback=second, retries=0) as traffic:
        wait_for(lambda: traffic.done_after(0) >= 4, 120, "captions before the signal")
        # a moment when a call has been in flight long enough to be inside the server
        wait_for(
            lambda: any(time.monotonic() - t >= ACCEPTED_AFTER_S for t in list(traffic.in_flight.values())),
            60,
            "a call in flight",
            poll=0.02,
        )
        accepted_before = time.monotonic() - ACCEPTED_AFTER_S
        serving.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(
            lambda: not TritonHttp(f"http://127.0.0.1:{serving.http_port}").server_ready(1), 10, "unready"
        )
        unready = time.monotonic()
        # a new request now: refused at once, and answered by the second server
        image = png(40, 30, fresh_seed() + 500_000)
        with CaptionClient(grpc, retries=0) as late, CaptionClient(second["grpc"], retries=0) as other:
            refused = traffic._call(late, "grpc", image)
            answered = traffic._call(other, "grpc", image, retried_on="second")
        # each thread goes on until a call of its is refused, sends that image to the second server and ends; then
        # the clients hang up (tritonserver 2.51 waits for open HTTP connections, idle or not, until its exit
        # timeout)
        wait_for(lambda: not any(t.is_alive() for t in traffic.threads), 60, "every thread refused", poll=0.2)
        traffic.close()
        code = serving.proc.wait(60)
        exited = time.monotonic()
    figures = traffic.figures(
        f"drain (SIGTERM to serve: unready after {unready - signalled:.2f} s, "
        f"exit status {code} after {exited - signalled:.1f} s)"
    )
    timeline = "\n".join(
        f"{c.protocol} {c.retried_on or 'primary'}: {c.start - signalled:+.2f} s .. {c.end - signalled:+.2f} s "
        f"{'ok' if c.error is None else type(c.error).__name__ + ': ' + str(c.error)[:120]}"
        for c in traffic.calls
        if c.end > signalled - 5
    )
    print(f"calls around the signal (times from it; unready at {unready - signalled:+.2f} s):\n{timeline}")
    primary = [c for c in traffic.calls if not c.retried_on and c is not refused]
    accepted = [c for c in primary if c.start <= accepted_before and c.end > signalled]
    in_flight = [c for c in primary if c.start < signalled < c.end]
    refusals = sum(c.error is not None for c in primary)
    print(
        f"in flight at the signal: {len(in_flight)}, answered {sum(c.error is None for c in in_flight)} "
        f"({len(accepted)} inside the server for {ACCEPTED_AFTER_S} s or more); refused later: {refusals}"
    )
    assert accepted, "no call was in flight at the signal"
    assert all(c.error is None for c in accepted), [str(c.error) for c in accepted]
    # what failed was refused, fast, and was not yet inside the server; the second server answered it
    for call in primary:
        if call.error is not None:
            assert isinstance(call.error, ServerUnavailableError), call.error
            assert call.seconds < REFUSED_BOUND_S and call.start > accepted_before, call
    fallbacks = [c for c in traffic.calls if c.retried_on]
    assert all(c.error is None for c in fallbacks), [str(c.error) for c in fallbacks]
    assert isinstance(refused.error, ServerUnavailableError), refused.error
    assert "the server is stopping" in str(refused.error), refused.error  # UNAVAILABLE from the drain flag
    assert refused.seconds < REFUSED_BOUND_S and answered.error is None
    # the process drained and exited by itself: status 0, within the exit timeout, nothing healed or restarted
    assert code == 0, serving.text()[-3000:]
    # status 0: tritonserver finished within its exit timeout (past it, it exits with 1); then it unloads its models
    assert exited - signalled < EXIT_TIMEOUT_S + UNLOAD_MARGIN_S
    after = serving.text().split("SIGTERM: stopping tritonserver")[-1]
    for sign in ("reloading it", "started again", "restarting it"):
        assert sign not in after, after[-3000:]
    # every load thread ended the one way it can without being stopped: refused, then answered elsewhere
    assert sum(c.retried_on == "fallback" for c in fallbacks) == len(PROTOCOLS), figures


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_invalid_argument_request_is_sent_once(hardened_server, protocol):
    url = hardened_server.grpc_address if protocol == "grpc" else hardened_server.http_url

    def requests() -> dict[str, float]:
        out = {}
        for model in ("caption", "preprocess"):
            for outcome in ("success", "failure"):
                out[f"{model}_{outcome}"] = model_metric(
                    hardened_server, f"nv_inference_request_{outcome}", model, settled=True
                )
        return out

    before = requests()
    with CaptionClient(url, retries=5, deadline=DEADLINE_S, backoff=0.1) as client:
        started = time.monotonic()
        with pytest.raises(InvalidInputError):
            client.caption(b"this is not an image", **FAST)
        seconds = time.monotonic() - started
        assert client.retry_count == 0
    after = requests()
    print(f"\n{protocol}: bad image refused in {seconds:.2f} s; requests {before} -> {after}")
    # preprocess answers a bad image with a per-request error from an execution that succeeds: Triton 2.51 counts
    # it as a success of preprocess (and twice as a failure of the ensemble); once per request that reached it
    reached = sum(after[k] - before[k] for k in ("preprocess_success", "preprocess_failure"))
    assert reached == 1, "the bad request reached the server more than once (or never)"
    assert after["caption_success"] == before["caption_success"]


# ----------------------------------------------------------------------------------------------- the image's command

#: A stand-in for tritonserver serving an ensemble ``e`` (readiness, repository index, configs, unload): ready until
#: SIGTERM, then a drain of 2 s (readiness 503) and exit 0. Unloads and the SIGTERM are written to files with their
#: time. Once the file ``hold`` exists, one repository index request waits for the SIGTERM and then lists a model
#: ``m`` as UNAVAILABLE: what the supervisor sees when a probe round is under way as the drain begins.
DRAINING_SERVER = textwrap.dedent(
    """
    import http.server, json, os, signal, sys, threading, time
    port = int(next(a for a in sys.argv if a.startswith("--http-port=")).split("=")[1])
    directory = os.environ["FAKE_DIR"]
    stopping, held = threading.Event(), threading.Lock()
    def note(name, text=""):
        with open(os.path.join(directory, name), "a") as f:
            f.write(f"{time.time()!r} {text}\\n")
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, code, body=b""):
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def do_GET(self):
            if self.path == "/v2/health/ready":
                return self._answer(503 if stopping.is_set() else 200)
            platform = "ensemble" if self.path.startswith("/v2/models/e") else "python"
            self._answer(200, json.dumps({"platform": platform, "inputs": [], "outputs": []}).encode())
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.endswith("/unload"):
                note("unloads", self.path)
                return self._answer(200, b"{}")
            if self.path != "/v2/repository/index":
                return self._answer(200, b"{}")
            hold = os.path.exists(os.path.join(directory, "hold")) and held.acquire(blocking=False)
            if hold:
                note("holding")
                stopping.wait(20)
            models = [{"name": "m", "state": "UNAVAILABLE"}] if hold else [{"name": "e", "state": "READY"}]
            self._answer(200, json.dumps(models).encode())
        def log_message(self, *args):
            pass
    def drain(*_):
        note("sigterm", "flag raised" if os.path.exists(os.environ["OFA_DRAIN_FILE"]) else "no flag")
        stopping.set()
        threading.Timer(2.0, lambda: os._exit(0)).start()
    signal.signal(signal.SIGTERM, drain)
    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)


def _noted(path: Path) -> list[tuple[float, str]]:
    return [
        (float(t), rest) for t, _, rest in (line.partition(" ") for line in path.read_text().splitlines())
    ]


def test_the_image_command_raises_the_drain_flag_forwards_sigterm_and_heals_nothing_while_draining(tmp_path):
    script = tmp_path / "draining_tritonserver.py"
    script.write_text(DRAINING_SERVER)
    ports = free_ports(3)
    env = _environment(tmp_path, ports, FAKE_DIR=str(tmp_path))
    command = [sys.executable, str(script), f"--http-port={ports[0]}", "--exit-timeout-secs=5"]
    command += ["--model-control-mode=explicit", "--load-model=*"]
    sup = start_supervised(tmp_path, ports, ["ofa_serving.supervisor", *command], env, "supervisor.log")
    try:
        _wait_ready(sup)
        (tmp_path / "hold").touch()
        wait_for(lambda: (tmp_path / "holding").exists(), 20, "a probe round under way")
        sent = time.time()
        sup.proc.send_signal(signal.SIGTERM)
        code = sup.proc.wait(30)
        ((received, flag),) = _noted(tmp_path / "sigterm")
        text = sup.text()
        print(f"\nSIGTERM forwarded {received - sent:.3f} s after the signal ({flag})")
        assert code == 0, text
        # the drain flag first (preprocess refuses new requests with UNAVAILABLE), then SIGTERM, at once
        assert flag == "flag raised" and not (tmp_path / "unloads").exists()
        assert received - sent < 1.0, "SIGTERM reached tritonserver late"
        # the probe round under way saw the drain: no heal, no restart
        assert "no heal while the server drains" in text
        assert "reloading it" not in text and "started again" not in text, text
        assert sup.counters()["heals_total"] == 0 and sup.counters()["server_crashes"] == 0
    finally:
        sup.close()
