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

A crashed tritonserver (killed by a signal such as SIGSEGV or the OOM killer's SIGKILL, or a non-zero exit while
no stop was asked for) is started again at once on the same ports by :func:`run_supervised`, which logs the signal
or status and counts it in the state file; ``OFA_MAX_SERVER_CRASHES`` crashes within
``OFA_SERVER_CRASH_WINDOW_S`` (5 in 300 s) are a crash loop: it gives up with a non-zero exit status.

The model-repository API is the server's only way to reload a model; the launcher starts tritonserver with
``--model-control-mode=explicit --load-model=*`` and restricts that API (HTTP and gRPC) to requests that carry
the header ``ofa-admin-key`` with a secret generated at start (:func:`model_control_flags`): clients cannot load
or unload models. ``python -m ofa_serving.supervisor tritonserver <flags>`` runs a tritonserver command line
under supervision (the container image's command).

A requested stop (SIGTERM/SIGINT to ``make serve`` or to the image's command) is a graceful drain (:func:`drain`):
the drain flag is raised (``preprocess`` refuses new requests at once with UNAVAILABLE) and tritonserver gets
SIGTERM at once (readiness false); the requests in flight are answered; from then on nothing is probed, healed or
restarted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .probe import ModelCheck, list_models, probe_model, probe_models
from .processes import proc_state, process_group, shm_pools, stub_pids, stub_shm_pool
from .security import ADMIN_HEADER, API_HEADER, admin_key_from_settings, restricted_api_flags
from .triton_api import TritonHttp, TritonHttpError

__all__ = [
    "ADMIN_HEADER",
    "model_control_flags",
    "new_admin_key",
    "Supervisor",
    "run_supervised",
    "drain",
    "StopSignals",
    "CrashLoop",
    "describe_exit",
    "exit_status",
    "main",
]


def new_admin_key() -> str:
    """The key of :data:`ADMIN_HEADER`: ``OFA_ADMIN_KEY`` or ``OFA_ADMIN_KEY_FILE`` when set (operators who call
    the admin APIs), else a fresh secret. Raises :class:`~ofa_serving.settings.SettingsError` for a bad one."""
    from .settings import SecuritySettings, load_settings

    return admin_key_from_settings(load_settings(SecuritySettings))


def model_control_flags(admin_key: str, api_key: str | None = None) -> list[str]:
    """tritonserver flags: explicit model control, every model loaded at start, the admin APIs (model repository
    among them) behind ``admin_key`` and, with ``api_key``, inference behind it
    (:func:`~ofa_serving.security.restricted_api_flags`)."""
    return ["--model-control-mode=explicit", "--load-model=*", *restricted_api_flags(admin_key, api_key)]


def _log(message: str) -> None:
    print(f"[supervisor] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- supervisor


class Supervisor:
    """Probe the models of ``server`` every ``interval_s`` seconds and heal the ones that fail.

    Args:
        server: the running server: ``.pid``, ``.http_url`` (a :class:`~ofa_serving.launcher.ServerProcess`).
        admin_key: the secret of :data:`ADMIN_HEADER` the server was started with.
        api_key: the inference key the server requires (header ``ofa-api-key``), sent with every probe; default:
            the server's ``api_key`` attribute if it has one, else none (inference open).
        interval_s: seconds between probe rounds.
        probe_timeout_s: how long one model's probe may take before it counts as unanswered.
        hang_after_s: a model whose probes go unanswered and that completes no execution for this long is hung.
        state_file: JSON file with the counters and the last events (``None``: none).
        restart: called to restart the whole server when a model cannot be healed (``None``: give up).
        max_heal_failures: failed heals of one model in a row before ``restart``.
        stopping: true once a stop of the server was requested (it drains): from then on no probe round runs
            and no model is healed, since killing a stub or unloading a model would fail the requests the drain
            is answering (default: only :meth:`stop` ends the rounds).
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
        api_key: str | None = None,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        self.server = server
        self.stopping = stopping
        #: admin APIs (repository, config, statistics); ``probe_headers``: those plus the inference key
        self.headers = {ADMIN_HEADER: admin_key}
        api_key = api_key or getattr(server, "api_key", None)
        self.probe_headers = {**self.headers, **({API_HEADER: api_key} if api_key else {})}
        self.interval_s, self.probe_timeout_s, self.hang_after_s = interval_s, probe_timeout_s, hang_after_s
        self.state_file = Path(state_file) if state_file else None
        self.restart_server, self.max_heal_failures, self.log = restart, max_heal_failures, log
        #: heals per model; ``restarts``: server restarts
        self.heals: Counter[str] = Counter()
        self.restarts = 0
        #: exits of tritonserver while not asked to stop (restarted by :func:`run_supervised` unless a crash loop)
        self.server_crashes = 0
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

    @property
    def api(self) -> TritonHttp:
        """The server's HTTP API with the admin key (repository, config, statistics)."""
        return TritonHttp(self.base_url, self.headers)

    # -- one round ----------------------------------------------------------------------------------------
    def check_once(self) -> list[str]:
        """Probe every model once and heal those that need it; the models healed."""
        try:
            states = list_models(self.base_url, headers=self.headers, timeout=self.probe_timeout_s)
        except (RuntimeError, OSError, ValueError) as exc:
            self.log(f"cannot list the models: {exc}")
            return []
        states = {m: state for m, state in states.items() if state not in ("LOADING", "UNLOADING")}
        for model, state in states.items():
            if state == "READY":
                self._is_ensemble(model)  # remember it while it has a config
        checks = probe_models(
            self.base_url, states, timeout=self.probe_timeout_s, headers=self.probe_headers, grace_s=5.0
        )
        healed = []
        for model, check in sorted(checks.items()):
            if self.draining():  # the probes saw the drain (refusals, the server stopping): not a fault
                self.log("a stop was requested: no heal while the server drains")
                break
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
        if any(proc_state(pid) in ("T", "t") for pid in pids):
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
                self._ensembles[model] = self.api.config(model, timeout=5).get("platform") == "ensemble"
            except (TritonHttpError, OSError, ValueError):
                return False
        return self._ensembles[model]

    def _executions(self, model: str) -> int | None:
        try:
            stats = self.api.statistics(model, timeout=5).get("model_stats", [])
            return sum(int(s.get("execution_count", 0)) for s in stats)
        except (TritonHttpError, OSError, ValueError):
            return None

    # -- healing ------------------------------------------------------------------------------------------

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
        self.api.unload(model, timeout=30)
        if self.draining():  # a stop came during the heal: loading would bring the drained ensembles back
            self.log(f"{model}: a stop was requested during the heal; not loading it again")
            return False
        status, text = self.api.load(model, timeout=600)
        self._reload_unloaded()
        check = probe_model(
            self.base_url, model, timeout=max(self.probe_timeout_s, 30.0), headers=self.probe_headers
        )
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
        self._event(model=model, reason=reason, healed=ok, seconds=round(seconds, 2))
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
                self.api.load(name, timeout=600)

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

    def _event(self, **fields: Any) -> None:
        """Remember an event (heal, crash) for the state file: the last 50."""
        self.events = [*self.events[-49:], {"time": time.time(), **fields}]

    def _write_state(self) -> None:
        if self.state_file is None:
            return
        state = {
            "heals": dict(self.heals),
            "heals_total": sum(self.heals.values()),
            "server_restarts": self.restarts,
            "server_crashes": self.server_crashes,
            "gave_up": self.gave_up,
            "events": self.events,
        }
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_file)

    def server_crashed(self, how: str, restarting: bool) -> None:
        """Count a crash of tritonserver (``how``: "killed by SIGSEGV", ...) and whether it is being restarted."""
        self.server_crashes += 1
        if restarting:
            self.restarts += 1
        else:
            self.gave_up = True
        self._event(server="tritonserver", reason=how, restarted=restarting, seconds=None)
        self._write_state()

    def server_back(self, seconds: float) -> None:
        """The server restarted after the last crash is ready again, ``seconds`` after that crash."""
        for event in reversed(self.events):
            if event.get("server"):
                event["seconds"] = round(seconds, 2)
                break
        self._write_state()

    # -- loop ---------------------------------------------------------------------------------------------
    def draining(self) -> bool:
        """Whether a stop was requested (:meth:`stop`, or the ``stopping`` callable): no more rounds or heals."""
        return self._stop.is_set() or (self.stopping is not None and self.stopping())

    def run(self) -> None:
        """Probe rounds every ``interval_s`` until :meth:`stop` (or giving up)."""
        while not self._stop.wait(self.interval_s):
            with self._round:
                if self._paused.is_set() or self.draining():
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


# ------------------------------------------------------------------------------------------- server crashes


def describe_exit(returncode: int) -> str:
    """How a process ended, from its ``Popen.returncode``: ``killed by SIGSEGV``, ``exited with status 1``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def exit_status(returncode: int) -> int:
    """The status a shell reports for ``Popen.returncode``: 128 + the signal for a process killed by one."""
    return 128 - returncode if returncode < 0 else returncode


class CrashLoop:
    """Crashes of tritonserver in a sliding window: ``max_crashes`` of them within ``window_s`` are a crash loop."""

    def __init__(
        self, max_crashes: int = 5, window_s: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_crashes, self.window_s, self.clock = max_crashes, window_s, clock
        self._times: deque[float] = deque()

    def crashed(self) -> bool:
        """Record a crash now; True when it completes a crash loop (give up rather than restart)."""
        now = self.clock()
        self._times.append(now)
        while now - self._times[0] > self.window_s:
            self._times.popleft()
        return len(self._times) >= self.max_crashes

    @property
    def recent(self) -> int:
        """Crashes within the window that ends at the last one recorded."""
        return len(self._times)


class _Leftovers:
    """What a dead tritonserver leaves behind: its stubs (its process group) and their shared-memory pools.

    The server maps the pool of every stub it runs and unlinks them when it exits cleanly; killed (or after a
    heal killed a stub) nobody does, and each pool takes megabytes of /dev/shm (RAM). The pools are noted while
    the server runs, since the stubs of a killed server exit by themselves within seconds.
    """

    def __init__(self) -> None:
        self.regions: set[str] = set()
        self._noted = 0.0

    def note(self, pid: int | None, every_s: float = 1.0) -> None:
        """Note the pools the server ``pid`` maps (at most every ``every_s`` seconds)."""
        if pid is not None and time.monotonic() - self._noted >= every_s:
            self._noted = time.monotonic()
            self.regions |= shm_pools(pid)

    def clean(self, pgid: int) -> list[str]:
        """Once the server (leader of process group ``pgid``) has exited: kill its stubs, remove their pools."""
        members = process_group(pgid)
        for pid in members:  # a stub just started may not have mapped its pool yet: it is on its command line
            self.regions |= shm_pools(pid) | stub_shm_pool(pid)
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        for pid in members:  # stubs orphaned to this process (PID 1 of a container) must be reaped by it
            with contextlib.suppress(ChildProcessError, OSError):
                while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
                    time.sleep(0.05)
        removed = []
        for path in sorted(self.regions):
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.unlink(path)
                removed.append(path)
        self.regions.clear()
        return removed


def run_supervised(server: Any, admin_key: str, stopping: Callable[[], bool], settings: Any = None) -> int:
    """Supervise the running, ready ``server`` until a stop is requested (``stopping()``) or it gives up; the exit
    status for the process.

    The models: a :class:`Supervisor` probes and heals them. The server itself: when tritonserver exits while
    no stop was requested, killed by a signal (SIGSEGV, SIGABRT, SIGKILL: the OOM killer) or with a non-zero
    status, its leftover stubs are killed, their shared memory removed, and it is started again at once with the
    same command on the same ports (a dead server's ports are free at once); the probes resume when it is ready.
    Each crash is logged with its signal or status and counted in the state file. The ``max_server_crashes``-th
    crash within ``server_crash_window_s`` is a crash loop: no restart, the status is non-zero (128 + the
    signal, or the server's status) and whatever supervises this process (make, the container runtime) acts.

    Returns tritonserver's own status after a requested stop (0 after a clean drain), 0 when it exited with 0
    on its own, 1 when a model could not be healed and the server not restarted, the last crash's status after a
    crash loop. ``server`` needs ``pid``, ``http_url``, ``http_port``, ``process``, ``start()``, ``stop(timeout=)``,
    ``terminate()`` and ``is_ready()`` (a :class:`~ofa_serving.launcher.ServerProcess`); the
    caller's signal handler starts the drain (:func:`drain`) when a stop is requested, and ``stopping()`` turns
    true: no probe round or heal from then on, no restart, and a server still running ``exit_timeout_secs`` + 15 s
    later is killed. ``settings`` is a
    :class:`~ofa_serving.settings.SupervisorSettings` (default: from the environment).
    """
    from .settings import SupervisorSettings, load_settings

    return _ServerWatch(server, admin_key, stopping, settings or load_settings(SupervisorSettings)).run()


class _ServerWatch:
    """The loop of :func:`run_supervised`: the server's process watched, restarted on request or after a crash."""

    def __init__(self, server: Any, admin_key: str, stopping: Callable[[], bool], settings: Any) -> None:
        self.server = server
        self.stopping = stopping
        self.settings = settings
        self.requested = threading.Event()  # a model cannot be healed by reloading: restart the server
        self.restarted = threading.Event()
        self.state = settings.state_file or default_state_file(server.http_port)
        self.supervisor = Supervisor(
            server,
            admin_key,
            interval_s=settings.probe_interval_s,
            probe_timeout_s=settings.probe_timeout_s,
            hang_after_s=settings.hang_after_s,
            state_file=self.state,
            restart=self.restart,
            stopping=stopping,
        )
        self.crashes = CrashLoop(settings.max_server_crashes, settings.server_crash_window_s)
        self.leftovers = _Leftovers()

    def restart(self) -> None:
        """Called from the supervisor's thread. The restart runs in the thread of :meth:`run` (the one that
        started the server: the server must not die with the supervisor's thread); wait for it."""
        self.restarted.clear()
        self.requested.set()
        while not self.restarted.wait(0.5) and not self.stopping():
            pass

    def start_again(self, since: float) -> bool:
        """Start the server again; True once it is ready (False: it exited first, or a stop was requested)."""
        server = self.server
        if self.stopping():  # asked to stop while no server ran: nothing to start, nothing to drain
            _log("a stop was requested while tritonserver was down; not starting it again")
            return False
        server.start()
        if self.stopping():  # the stop signal came while the server was being started: pass it on
            server.terminate()
            return False
        _log(f"tritonserver started again (pid {server.pid}) {time.monotonic() - since:.1f} s after it ended")
        while server.process.poll() is None and not self.stopping():
            if server.is_ready():
                return True
            time.sleep(0.25)
        return False

    def run(self) -> int:
        """Watch until a stop is requested or supervision ends; the exit status (see :func:`run_supervised`)."""
        settings = self.settings
        _log(
            f"supervising tritonserver (pid {self.server.pid}): every model probed every "
            f"{settings.probe_interval_s:g} s; restarted when it crashes, up to {settings.max_server_crashes - 1} "
            f"time(s) within {settings.server_crash_window_s:g} s; heal counters in {self.state}"
        )
        self.supervisor.start()
        try:
            while True:
                process = self.server.process
                self._wait_for_an_event(process)
                if self.stopping():
                    break
                if self.supervisor.gave_up:  # a model could not be healed and no restart was possible
                    self.supervisor.stop()
                    self.server.stop(timeout=10)
                    self.leftovers.clean(process.pid)
                    return 1
                status = (
                    self._restart_on_request(process)
                    if self.requested.is_set()
                    else self._after_exit(process)
                )
                if status is not None:
                    return status
            # A stop was requested: the caller's signal handler sent it to tritonserver, which drains: readiness
            # false, new requests refused with UNAVAILABLE, those in flight answered, exit within its
            # --exit-timeout-secs. No probe round and no heal meanwhile (``stopping`` tells the supervisor), no
            # restart after it.
            self.supervisor.stop()
            code = _wait_for_drain(self.server)
            self.leftovers.clean(self.server.process.pid)
            return exit_status(code)
        finally:
            self.restarted.set()  # a supervisor waiting for a restart that will not come
            self.supervisor.stop()

    def _wait_for_an_event(self, process: Any) -> None:
        """Until the server exits, a stop is requested, the supervisor gives up or asks for a restart."""
        while (
            process.poll() is None
            and not self.stopping()
            and not self.supervisor.gave_up
            and not self.requested.is_set()
        ):
            self.leftovers.note(process.pid)
            time.sleep(0.2)

    def _restart_on_request(self, process: Any) -> int | None:
        """The supervisor asked for a restart: stop the server, start it again; None to go on watching."""
        _log(f"stopping tritonserver (pid {process.pid}) to start it again")
        since = time.monotonic()
        self.server.stop(timeout=10)
        self.leftovers.clean(process.pid)
        try:
            ready = self.start_again(since)
        except (OSError, RuntimeError) as exc:
            _log(f"cannot start tritonserver again ({exc}); giving up")
            return 1
        if ready:
            _log(
                f"tritonserver is ready again (pid {self.server.pid}) after {time.monotonic() - since:.1f} s"
            )
        self.requested.clear()
        self.restarted.set()
        return None

    def _after_exit(self, process: Any) -> int | None:
        """The server exited unasked: 0 ends supervision; a crash is restarted unless it makes a crash loop.
        The exit status to return, or None to go on watching."""
        settings, supervisor = self.settings, self.supervisor
        code, pid, since = process.returncode, process.pid, time.monotonic()
        if code == 0:
            _log(f"tritonserver (pid {pid}) exited with status 0 without being asked to; stopping too")
            supervisor.stop()
            self.leftovers.clean(pid)
            self.server.stop(timeout=0)
            return 0
        how = describe_exit(code)
        supervisor._paused.set()  # no probe rounds until it is back (one in progress ends by itself)
        loop = self.crashes.crashed()
        removed = self.leftovers.clean(pid)
        self.server.stop(timeout=0)  # closes what the launcher holds for it
        count = (
            f"crash {self.crashes.recent} within {settings.server_crash_window_s:g} s; "
            f"{settings.max_server_crashes} make a crash loop"
        )
        shm = f"; removed its {len(removed)} shared-memory pool(s)" if removed else ""
        if loop:
            _log(
                f"tritonserver (pid {pid}) {how} ({count}); giving up with exit status "
                f"{exit_status(code)} (the restart policy takes over){shm}"
            )
            supervisor.server_crashed(how, restarting=False)
            return exit_status(code)
        _log(f"tritonserver (pid {pid}) {how} while not asked to stop ({count}); restarting it{shm}")
        supervisor.server_crashed(how, restarting=True)
        try:
            ready = self.start_again(since)
        except (OSError, RuntimeError) as exc:
            _log(f"cannot start tritonserver again ({exc}); giving up")
            return exit_status(code)
        if ready:
            seconds = time.monotonic() - since
            _log(f"tritonserver is ready again (pid {self.server.pid}), {seconds:.1f} s after the crash")
            supervisor.server_back(seconds)
            supervisor.resume()
            if self.requested.is_set():  # the fresh server is the restart the supervisor asked for
                self.requested.clear()
                self.restarted.set()
        return None


def drain(server: Any) -> None:
    """Begin the graceful stop of the running ``server``: raise its drain flag, then SIGTERM (does not wait).

    tritonserver 2.51 alone turns readiness false on SIGTERM but goes on accepting new requests on connections that
    clients hold open (HTTP keep-alive, gRPC channels) until its exit timeout, and then exits cutting short the
    requests in flight (docs/reliability.md). With the flag (``server.drain_file``, the ``OFA_DRAIN_FILE`` of its
    ``preprocess``) raised first, every new request is refused at once with UNAVAILABLE (HTTP 503), which clients
    and proxies retry on another replica, while the requests already past ``preprocess`` are answered.
    """
    with contextlib.suppress(OSError):
        Path(server.drain_file).touch()
    server.terminate()


class StopSignals:
    """SIGTERM and SIGINT of a process that runs tritonserver in the foreground (``make serve``, the image's
    command), passed on to ``server``: the one signal handler of both.

    The first signal starts the graceful stop and makes :meth:`requested` true (no probe, heal or restart from then
    on): once :attr:`supervising` (the server is ready and supervised) the drain (:func:`drain`), before that a
    plain SIGTERM. A later signal kills tritonserver when ``second_kills`` (``make serve``: a second Ctrl-C), else
    it is passed on as it is.
    """

    def __init__(self, server: Any, log: Callable[[str], None], *, second_kills: bool) -> None:
        self.server, self.log, self.second_kills = server, log, second_kills
        #: stop signals received so far
        self.count = 0
        #: set once the server is ready and supervised: a stop raises the drain flag first
        self.supervising = False

    def requested(self) -> bool:
        """Whether a stop signal came."""
        return self.count > 0

    def install(self) -> StopSignals:
        """Handle SIGTERM and SIGINT of this process (call from the main thread)."""
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)
        return self

    def __call__(self, signum: int, _frame: object = None) -> None:
        self.count += 1
        server = self.server
        if server.process is None or server.process.poll() is not None:
            return
        if self.count == 1:
            self.log(
                f"{signal.Signals(signum).name}: stopping tritonserver (pid {server.pid}) gracefully: readiness "
                "turns false, new requests are refused (UNAVAILABLE), those in flight are answered within "
                f"{server.exit_timeout_secs} s (its exit timeout); no heal or restart meanwhile"
            )
            if self.supervising:  # the drain flag first: tritonserver alone keeps accepting requests
                drain(server)
                self.log("drain flag raised (new requests refused with UNAVAILABLE); SIGTERM sent")
            else:
                server.terminate()
        elif self.second_kills:
            self.log("second signal: killing tritonserver")
            server.process.kill()
        else:
            server.process.send_signal(signum)


#: How long past its own exit timeout a draining tritonserver may take before it is killed.
_DRAIN_GRACE_S = 15.0


def _wait_for_drain(server: Any) -> int:
    """Wait for the draining ``server`` to exit; its returncode. tritonserver itself ends the drain after its exit
    timeout (``server.exit_timeout_secs``); one still running :data:`_DRAIN_GRACE_S` later is killed."""
    process = server.process
    limit = getattr(server, "exit_timeout_secs", None)
    try:
        return process.wait(None if limit is None else limit + _DRAIN_GRACE_S)
    except subprocess.TimeoutExpired:
        _log(
            f"tritonserver (pid {process.pid}) still draining {limit + _DRAIN_GRACE_S:g} s after the stop; killing it"
        )
        process.kill()
        return process.wait()


def main(argv: list[str] | None = None) -> int:
    """``python -m ofa_serving.supervisor tritonserver <flags>``: run that server, keep its models healthy and
    restart it when it crashes (:func:`run_supervised`).

    The command must contain ``--model-control-mode=explicit`` and ``--load-model=*``; the restricted-API flags
    with a fresh key are appended. SIGTERM/SIGINT drain tritonserver (:class:`StopSignals`: the drain flag raised,
    then SIGTERM); before it is ready the first is a plain SIGTERM, later ones go to it as they are. The exit status
    is its own, or non-zero after a crash loop.
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
    from .security import api_key_from_settings, grpc_tls_flags
    from .settings import SecuritySettings, SettingsError, SupervisorSettings, load_settings

    try:
        settings = load_settings(SupervisorSettings)
        security = load_settings(SecuritySettings)
        key, api_key = admin_key_from_settings(security), api_key_from_settings(security)
        tls = grpc_tls_flags(security.grpc_tls_cert, security.grpc_tls_key, security.grpc_tls_ca)
    except SettingsError as exc:
        _log(f"error: {exc}")
        return 2
    from .launcher import ServerProcess

    # the admin APIs behind the key, inference behind OFA_API_KEY if set, gRPC over TLS if configured; its start
    # writes the key file that the image's HEALTHCHECK probe reads (owner-only); the supervisor's probes send both keys
    server = ServerProcess.from_command(
        command + restricted_api_flags(key, api_key) + tls, admin_key=key, api_key=api_key
    )
    stop = StopSignals(server, _log, second_kills=False).install()
    server.start()
    while server.process.poll() is None and not stop.requested() and not server.is_ready():
        time.sleep(1)
    if server.process.poll() is not None or stop.requested():
        code = server.process.wait()
        if not stop.requested():
            _log(f"tritonserver (pid {server.pid}) {describe_exit(code)} before it was ready")
        server.stop(timeout=0)
        return exit_status(code)
    stop.supervising = True
    return run_supervised(server, key, stop.requested, settings)


if __name__ == "__main__":
    sys.exit(main())
