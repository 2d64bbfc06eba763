"""Keep every model of a tritonserver answering: detect a dead or hung Python backend stub and reload its model.

tritonserver 2.51 never restarts a dead stub and keeps reporting the model ready (docs/reliability.md). The
supervisor runs beside the server (a thread of ``make serve``; the entrypoint of the container image) and every
``interval_s`` seconds runs the deep probe of :mod:`.probe` on every model the server's repository index lists.

* **Dead stub** (SIGKILL, OOM kill, segfault), **frozen stub** (SIGSTOP: Triton answers "not healthy" within a
  second), a model whose engine keeps failing (it unloads itself, see ``model_repository/ofa/1/model.py``), or
  any other error of a probe: the model is healed at once.
* **Hung stub** (no answer): its stub is stopped (``T`` in ``/proc``), or its probes time out and it completes no
  execution for ``hang_after_s`` (60 s by default, ``OFA_HANG_AFTER_S``); a busy model completes executions and is
  left alone, however long its queue.

Healing a model: SIGKILL its stubs (a hung stub would otherwise hold the unload), unload it through the
model-repository API (its ensembles unload with it: readiness turns false, load balancers stop sending), load it
again (its ensembles come back with it), probe it. Each heal writes a log line and counts in :attr:`Supervisor.heals`
and the state file (``OFA_SUPERVISOR_STATE``, JSON). If a model cannot be healed ``max_heal_failures`` times in a
row the supervisor restarts tritonserver (when it can) or gives up, so that the container is restarted.

The model-repository API is the server's only way to reload a model; the launcher starts tritonserver with
``--model-control-mode=explicit --load-model=*`` and restricts that API (HTTP and gRPC) to requests that carry
the header ``ofa-admin-key`` with a secret generated at start (:func:`model_control_flags`): clients cannot load
or unload models. ``python -m ofa_serving.supervisor tritonserver <flags>`` runs a tritonserver command line
under supervision (the container image's command).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .probe import ModelCheck, list_models, probe_model, server_ready

__all__ = [
    "ADMIN_HEADER",
    "model_control_flags",
    "new_admin_key",
    "stub_pids",
    "Supervisor",
    "CommandServer",
    "run_supervised",
    "main",
]

#: The header the model-repository API of a supervised server requires (HTTP; gRPC metadata gets Triton's prefix).
ADMIN_HEADER = "ofa-admin-key"
_STUB = "triton_python_backend_stub"


def new_admin_key() -> str:
    """A fresh secret for :data:`ADMIN_HEADER` (``OFA_ADMIN_KEY`` when set: operators who call the API)."""
    return os.environ.get("OFA_ADMIN_KEY", "").strip() or secrets.token_urlsafe(24)


def model_control_flags(admin_key: str) -> list[str]:
    """tritonserver flags: explicit model control, every model loaded at start, repository API behind the key."""
    restricted = f"model-repository:{ADMIN_HEADER}={admin_key}"
    return [
        "--model-control-mode=explicit",
        "--load-model=*",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
    ]


def _log(message: str) -> None:
    print(f"[supervisor] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _cmdline(pid: int) -> list[str]:
    try:
        return [
            p.decode(errors="replace") for p in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if p
        ]
    except OSError:
        return []


def stub_pids(server_pid: int, model: str) -> list[int]:
    """PIDs of the Python backend stubs of ``model`` (instances ``<model>_<group>_<index>``) under ``server_pid``."""
    instance = re.compile(rf"^{re.escape(model)}_\d+_\d+$")
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields is None or int(fields[1]) != server_pid or fields[0] in ("Z", "X"):
            continue
        args = _cmdline(int(entry.name))
        if args and args[0].endswith(_STUB) and any(instance.match(a) for a in args[1:]):
            out.append(int(entry.name))
    return sorted(out)


def _stopped(pid: int) -> bool:
    fields = _proc_stat(pid)
    return fields is not None and fields[0] in ("T", "t")


# ------------------------------------------------------------------------------------------- supervisor


class Supervisor:
    """Probe the models of ``server`` every ``interval_s`` seconds and heal the ones that fail.

    Args:
        server: the running server: ``.pid``, ``.http_url`` (a :class:`~ofa_serving.launcher.TritonServer` or a
            :class:`CommandServer`).
        admin_key: the secret of :data:`ADMIN_HEADER` the server was started with.
        interval_s: seconds between probe rounds.
        probe_timeout_s: how long one model's probe may take before it counts as unanswered.
        hang_after_s: a model whose probes go unanswered and that completes no execution for this long is hung.
        state_file: JSON file with the counters and the last events (``None``: none).
        restart: called to restart the whole server when a model cannot be healed (``None``: give up).
        max_heal_failures: failed heals of one model in a row before ``restart``.
    """

    def __init__(
        self,
        server: Any,
        admin_key: str,
        *,
        interval_s: float = 5.0,
        probe_timeout_s: float = 10.0,
        hang_after_s: float = 60.0,
        state_file: str | Path | None = None,
        restart: Callable[[], None] | None = None,
        max_heal_failures: int = 3,
        log: Callable[[str], None] = _log,
    ) -> None:
        self.server = server
        self.headers = {ADMIN_HEADER: admin_key}
        self.interval_s, self.probe_timeout_s, self.hang_after_s = interval_s, probe_timeout_s, hang_after_s
        self.state_file = Path(state_file) if state_file else None
        self.restart_server, self.max_heal_failures, self.log = restart, max_heal_failures, log
        #: heals per model; ``restarts``: server restarts
        self.heals: Counter[str] = Counter()
        self.restarts = 0
        self.events: list[dict[str, Any]] = []
        self.gave_up = False
        self._ensembles: dict[str, bool] = {}
        self._progress: dict[str, tuple[float, int | None]] = {}  # since when, at which execution count
        self._failed_heals: Counter[str] = Counter()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._round = threading.Lock()
        self._thread: threading.Thread | None = None
        self._write_state()

    @property
    def base_url(self) -> str:
        return self.server.http_url.rstrip("/")

    # -- one round ----------------------------------------------------------------------------------------
    def check_once(self) -> list[str]:
        """Probe every model once and heal those that need it; the models healed."""
        try:
            states = list_models(self.base_url, headers=self.headers, timeout=self.probe_timeout_s)
        except (RuntimeError, OSError, ValueError) as exc:
            self.log(f"cannot list the models: {exc}")
            return []
        checks: dict[str, ModelCheck] = {}
        threads = []
        for model, state in states.items():
            if state in ("LOADING", "UNLOADING"):
                continue
            if state != "READY":
                checks[model] = ModelCheck(model, "not_ready", f"state {state or 'unknown'}", 0.0)
                continue
            self._is_ensemble(model)  # remember it while it has a config

            def run(name: str = model) -> None:
                checks[name] = probe_model(self.base_url, name, timeout=self.probe_timeout_s)

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(self.probe_timeout_s + 5)
        healed = []
        for model, check in sorted(checks.items()):
            reason = self._needs_heal(model, check)
            if reason and self.heal(model, reason):
                healed.append(model)
        return healed

    def _needs_heal(self, model: str, check: ModelCheck) -> str | None:
        if check.ok:
            self._progress.pop(model, None)
            return None
        if check.status == "not_ready":
            if not self._is_ensemble(model):
                return f"not loaded ({check.detail})"
            return None  # an ensemble comes back with its steps
        if check.status == "error":
            if check.detail.startswith("HTTP 5"):  # INTERNAL: a dead or frozen stub, a failing engine
                return check.detail
            self.log(f"{model}: the probe was refused ({check.detail}); not a reason to reload it")
            return None
        # Unanswered or refused by a full queue: busy or hung.
        pids = stub_pids(self.server.pid, model)
        if any(_stopped(pid) for pid in pids):
            return f"stub {pids} stopped (no answer within {self.probe_timeout_s:.0f} s)"
        # Unanswered: busy or hung. Busy models complete executions; a hung one completes none for hang_after_s.
        now, executions = time.monotonic(), self._executions(model)
        since, seen = self._progress.get(model, (now, None))
        if seen is None or executions is None or executions != seen:
            since, seen = now, executions
        self._progress[model] = (since, seen)
        if now - since >= self.hang_after_s:
            return f"hung: no answer within {self.probe_timeout_s:.0f} s and no execution completed for {now - since:.0f} s"
        return None

    def _is_ensemble(self, model: str) -> bool:
        """Whether ``model`` is an ensemble (remembered from when it was loaded: an unloaded model has no config)."""
        if model not in self._ensembles:
            try:
                with urllib.request.urlopen(f"{self.base_url}/v2/models/{model}/config", timeout=5) as resp:
                    self._ensembles[model] = json.loads(resp.read()).get("platform") == "ensemble"
            except (urllib.error.URLError, OSError, ValueError):
                return False
        return self._ensembles[model]

    def _executions(self, model: str) -> int | None:
        try:
            with urllib.request.urlopen(f"{self.base_url}/v2/models/{model}/stats", timeout=5) as resp:
                stats = json.loads(resp.read()).get("model_stats", [])
            return sum(int(s.get("execution_count", 0)) for s in stats)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    # -- healing ------------------------------------------------------------------------------------------
    def _repository(self, action: str, model: str, timeout: float) -> tuple[int, str]:
        req = urllib.request.Request(
            f"{self.base_url}/v2/repository/models/{model}/{action}",
            data=b"{}",
            headers=self.headers,
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, ""
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()[:300].decode(errors="replace")
        except (urllib.error.URLError, OSError) as exc:
            return 0, str(exc)

    def heal(self, model: str, reason: str) -> bool:
        """Kill ``model``'s stubs, unload and load it, probe it; log and count. True when it answers again."""
        start = time.monotonic()
        pids = stub_pids(self.server.pid, model)
        self.log(f"{model}: {reason}; reloading it (killing stubs {pids})")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Unloading returns at once; a model whose stub died stays UNLOADING in 2.51 (its old instance is never
        # finalized), but loading it again does not wait for that: load right away.
        self._repository("unload", model, timeout=30)
        status, text = self._repository("load", model, timeout=600)
        self._reload_unloaded()
        check = probe_model(self.base_url, model, timeout=max(self.probe_timeout_s, 30.0))
        seconds = time.monotonic() - start
        # loaded, and the probe answered, or is still waiting behind queued requests (the next rounds judge that)
        ok = status == 200 and check.status in ("ok", "timeout")
        self._progress.pop(model, None)
        if ok:
            self.heals[model] += 1
            self._failed_heals[model] = 0
            total = sum(self.heals.values())
            busy = "" if check.ok else f"; its probe is still queued after {check.seconds:.0f} s"
            self.log(
                f"{model}: healed in {seconds:.1f} s (heals: {model}={self.heals[model]}, total={total}, "
                f"server restarts={self.restarts}){busy}"
            )
        else:
            self._failed_heals[model] += 1
            self.log(
                f"{model}: NOT healed after {seconds:.1f} s (load: HTTP {status} {text}; probe: {check.status} "
                f"{check.detail}); {self._failed_heals[model]} failed heal(s) in a row"
            )
        self.events.append(
            {
                "time": time.time(),
                "model": model,
                "reason": reason,
                "healed": ok,
                "seconds": round(seconds, 2),
            }
        )
        self.events = self.events[-50:]
        if not ok and self._failed_heals[model] >= self.max_heal_failures:
            self._restart_or_give_up(model)
        self._write_state()
        return ok

    def _reload_unloaded(self) -> None:
        """Load whatever is still unloaded (ensembles come back with their steps; this covers the others)."""
        try:
            states = list_models(self.base_url, headers=self.headers, timeout=10)
        except (RuntimeError, OSError, ValueError):
            return
        for name, state in states.items():
            if state == "UNAVAILABLE":
                self._repository("load", name, timeout=600)

    def _restart_or_give_up(self, model: str) -> None:
        self._failed_heals.clear()
        if self.restart_server is None:
            self.gave_up = True
            self.log(f"{model}: cannot be healed; giving up (the container's restart policy takes over)")
            self._stop.set()
            return
        self.log(f"{model}: cannot be healed by reloading; restarting tritonserver")
        self.restarts += 1
        self.restart_server()

    def _write_state(self) -> None:
        if self.state_file is None:
            return
        state = {
            "heals": dict(self.heals),
            "heals_total": sum(self.heals.values()),
            "server_restarts": self.restarts,
            "gave_up": self.gave_up,
            "events": self.events,
        }
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_file)

    # -- loop ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Probe rounds every ``interval_s`` until :meth:`stop` (or giving up)."""
        while not self._stop.wait(self.interval_s):
            with self._round:
                if self._paused.is_set():
                    continue
                try:
                    self.check_once()
                except Exception as exc:  # noqa: BLE001 - the supervisor must outlive any one round
                    self.log(f"probe round failed: {type(exc).__name__}: {exc}")

    def pause(self) -> None:
        """No probe rounds until :meth:`resume`; returns once the round in progress (if any) is over."""
        self._paused.set()
        with self._round:
            pass

    def resume(self) -> None:
        """Probe rounds again."""
        self._paused.clear()

    def start(self) -> Supervisor:
        """Learn which models are ensembles (the server is ready: all are loaded), run :meth:`run` in a thread."""
        with contextlib.suppress(RuntimeError, OSError, ValueError):
            for model in list_models(self.base_url, headers=self.headers, timeout=self.probe_timeout_s):
                self._is_ensemble(model)
        self._thread = threading.Thread(target=self.run, name="supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop (after the round in progress)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.probe_timeout_s + 60)

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def default_state_file(http_port: int) -> Path:
    """Where the counters go when ``OFA_SUPERVISOR_STATE`` is not set."""
    return Path(tempfile.gettempdir()) / f"ofa-supervisor-{http_port}.json"


# ------------------------------------------------------------------------------------------- command line


class CommandServer:
    """A tritonserver command line run as a child process (the container image: ``tritonserver`` on PATH)."""

    def __init__(self, command: Sequence[str]) -> None:
        self.command = list(command)
        port = next((a.split("=", 1)[1] for a in self.command if a.startswith("--http-port=")), "8000")
        self.http_port = int(port)
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> CommandServer:
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
        return self

    def is_ready(self) -> bool:
        return server_ready(self.http_url)

    def stop(self, timeout: float = 40.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def run_supervised(server: Any, admin_key: str, stopping: Callable[[], bool], settings: Any = None) -> int:
    """Supervise the running, ready ``server`` until it exits (or ``stopping()``); its exit code.

    ``server`` needs ``pid``, ``http_url``, ``http_port``, ``process``, ``stop(timeout=)``, ``start()`` and
    ``wait_ready()`` or ``is_ready()`` (:class:`~ofa_serving.launcher.TritonServer`, :class:`CommandServer`).
    ``settings`` is a :class:`~ofa_serving.settings.SupervisorSettings` (default: from the environment).
    """
    from .settings import SupervisorSettings, load_settings

    settings = settings or load_settings(SupervisorSettings)
    restarting = threading.Event()

    def restart() -> None:
        restarting.set()
        try:
            server.stop(timeout=10)
            server.start()
        finally:
            restarting.clear()
        while server.process.poll() is None and not server.is_ready():
            time.sleep(1)

    state = settings.state_file or default_state_file(server.http_port)
    supervisor = Supervisor(
        server,
        admin_key,
        interval_s=settings.probe_interval_s,
        probe_timeout_s=settings.probe_timeout_s,
        hang_after_s=settings.hang_after_s,
        state_file=state,
        restart=restart,
    )
    _log(
        f"supervising tritonserver (pid {server.pid}): every model probed every {settings.probe_interval_s:g} s; "
        f"heal counters in {state}"
    )
    supervisor.start()
    try:
        while True:
            process = server.process
            while process.poll() is None and not stopping() and not supervisor.gave_up:
                time.sleep(0.2)
            while restarting.is_set():
                time.sleep(0.2)
            if stopping() or supervisor.gave_up or server.process is process:
                break
        supervisor.stop()  # no probes while the server drains (its endpoints close)
        if supervisor.gave_up:
            server.stop(timeout=10)
            return 1
        return server.process.wait()
    finally:
        supervisor.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m ofa_serving.supervisor tritonserver <flags>``: run that server and keep its models healthy.

    The command must contain ``--model-control-mode=explicit`` and ``--load-model=*``; the restricted-API flags
    with a fresh key are appended. SIGTERM/SIGINT go to tritonserver (graceful drain); the exit code is its own.
    """
    parser = argparse.ArgumentParser(
        prog="python -m ofa_serving.supervisor", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the tritonserver command line")
    args = parser.parse_args(argv)
    command = [a for a in args.command if a != "--"]
    if not command:
        parser.error("no tritonserver command given")
    if "--model-control-mode=explicit" not in command or "--load-model=*" not in command:
        parser.error(
            "the command must load every model under explicit model control (see model_control_flags)"
        )
    key = new_admin_key()
    server = CommandServer(command + model_control_flags(key)[2:])
    stopping = threading.Event()

    def forward(signum, _frame):
        stopping.set()
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    server.start()
    while server.process.poll() is None and not stopping.is_set() and not server.is_ready():
        time.sleep(1)
    if server.process.poll() is not None or stopping.is_set():
        return server.process.wait()
    code = run_supervised(server, key, stopping.is_set)
    return server.process.wait() if stopping.is_set() else code


if __name__ == "__main__":
    sys.exit(main())
