"""Helpers of the hardening tests, the burst and the soak: memory, listening sockets, raw request bursts, retries.

Standard library + numpy only at import time (``tritonclient`` is imported where a burst is fired), Linux only
(``/proc``). tritonserver's processes (its Python backend stubs) are found by :mod:`ofa_serving.processes`.

* processes: :func:`memory_status` and :func:`rss_bytes` (``/proc/<pid>/status``), :func:`shm_pool_bytes`,
  :func:`server_pid_on_port`, :func:`listening_addresses`, :func:`live_stubs` (the liveness check is
  ``ofa_serving.probe``, shipped in the image);
* memory over time: :class:`RssSampler`, :func:`rss_growth`;
* bursts: :func:`fire` sends many ``caption`` requests at once over gRPC (asynchronous calls from one thread, so
  a burst really arrives within milliseconds) and returns one :class:`Outcome` per request;
* client retries: :class:`ClientRetries` counts ``client.CaptionClient``'s retries by cause, so that the tools
  report them apart from failures.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ofa_serving.processes import server_processes, stub_processes

# ------------------------------------------------------------------------------------------- client retries

#: Longest part of an error message kept as a retry's cause.
CAUSE_CHARS = 100


def retry_cause(error_type: str, message: str) -> str:
    """A short, stable name for why a request was retried: the error type and the start of the server's message
    (the client's " (gave up after ...)" note and a per-request id dropped)."""
    message = re.sub(r"\[request id: [^\]]*\] ", "", message.split(" (gave up after ")[0])
    return f"{error_type}: {message[:CAUSE_CHARS]}"


class ClientRetries(logging.Handler):
    """Counts the retries of every ``client.CaptionClient`` in this process by cause, from the DEBUG record the
    client logs per retry (logger ``client``, attributes ``retry_error`` and ``retry_message``). Use as a context
    manager: it turns that logger's DEBUG records on while installed (and only sends them here)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.causes: Counter[str] = Counter()
        self._counting = threading.Lock()
        self._saved: tuple[int, bool] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        error_type = getattr(record, "retry_error", None)
        if error_type is None:
            return
        message = str(getattr(record, "retry_message", ""))
        with self._counting:
            self.causes[retry_cause(error_type, message)] += 1

    @property
    def total(self) -> int:
        """Retries counted so far."""
        with self._counting:
            return sum(self.causes.values())

    def summary(self) -> dict[str, object]:
        """``{"total": n, "by_cause": {cause: count}}``, most frequent cause first."""
        with self._counting:
            return {"total": sum(self.causes.values()), "by_cause": dict(self.causes.most_common())}

    def __enter__(self) -> ClientRetries:
        logger = logging.getLogger("client")
        self._saved = (logger.level, logger.propagate)
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False  # the retries are counted here, not printed by the root logger
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("client")
        logger.removeHandler(self)
        if self._saved is not None:
            logger.setLevel(self._saved[0])
            logger.propagate = self._saved[1]


def format_retries(summary: Mapping[str, object], limit: int = 5) -> str:
    """One line for a table: ``"12 (ServerUnavailableError: ...: 9; ...)"``, or ``"0"``."""
    total = int(summary.get("total", 0) or 0)
    causes = dict(summary.get("by_cause", {}) or {})
    if not total:
        return "0"
    shown = "; ".join(f"{cause}: {n}" for cause, n in list(causes.items())[:limit])
    more = f"; {len(causes) - limit} more causes" if len(causes) > limit else ""
    return f"{total} ({shown}{more})"


# ------------------------------------------------------------------------------------------- processes


def memory_status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` (peak RSS), ``RssAnon``, ``RssFile``, ``RssShmem`` of ``pid`` in bytes ({} if gone).

    ``RssShmem`` is what the Python backend's shared-memory pool (/dev/shm) adds: tritonserver maps each stub's
    pool, and maps it again each time the pool grows.
    """
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return out


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes (``None`` if it is gone)."""
    return memory_status(pid).get("VmRSS")


def shm_pool_bytes(pid: int) -> int:
    """Total size of the /dev/shm files (Python backend pools) that process ``pid`` maps."""
    files = set()
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
                files.add(parts[5])
    except OSError:
        return 0
    total = 0
    for name in files:
        try:
            total += os.stat(name).st_size
        except OSError:
            continue
    return total


def server_pid_on_port(port: int) -> int | None:
    """PID of the process listening on TCP ``port`` (any address), or ``None``."""
    inodes = {inode for _addr, p, inode in _listening_sockets() if p == port}
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                    return int(entry.name)
        except OSError:
            continue
    return None


def _listening_sockets() -> list[tuple[str, int, int]]:
    """``(address, port, inode)`` of every listening TCP socket (IPv4 and IPv6) of this machine."""
    out = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] != "0A":  # LISTEN
                continue
            hex_addr, hex_port = parts[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc shows the address as 32-bit words in host byte order (little endian here)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out.append((socket.inet_ntop(family, raw), int(hex_port, 16), int(parts[9])))
    return out


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket that process ``pid`` listens on."""
    owned = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owned.add(int(target[8:-1]))
    except OSError:
        return []
    return sorted((addr, port) for addr, port, inode in _listening_sockets() if inode in owned)


def live_stubs(pid: int | None) -> dict[str, int]:
    """``{instance: pid}`` of the Python backend stubs of server ``pid`` (``{}`` when its PID is unknown)."""
    return {s.instance: s.pid for s in stub_processes(pid)} if pid else {}


# ------------------------------------------------------------------------------------------- memory


@dataclass
class RssSampler:
    """Samples the RSS of a tritonserver and its stubs every ``interval`` seconds in a background thread.

    ``samples`` holds ``{"t": seconds since start, "<process>": bytes, ...}`` dicts; a stub that restarts under a
    new PID keeps its instance name. Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    server_pid: int
    interval: float = 5.0
    samples: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    def sample(self) -> dict[str, float]:
        """One row: ``<process>`` = RSS, plus ``<process>.anon`` / ``<process>.shmem`` (private memory and
        shared-memory pages of that RSS) and ``shm_pool`` (size of the pools the server maps)."""
        row: dict[str, float] = {"t": round(time.monotonic() - self._t0, 2)}
        for name, pid in server_processes(self.server_pid).items():
            status = memory_status(pid)
            if "VmRSS" in status:
                row[name] = status["VmRSS"]
                row[f"{name}.anon"] = status.get("RssAnon", 0)
                row[f"{name}.shmem"] = status.get("RssShmem", 0)
        row["shm_pool"] = shm_pool_bytes(self.server_pid)
        self.samples.append(row)
        return row

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        return self.samples

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def rss_growth(
    samples: Sequence[Mapping[str, float]], warmup_s: float, window_s: float = 30.0
) -> dict[str, dict[str, float]]:
    """Per process: RSS right after warm-up vs. at the end, and the growth between them.

    ``baseline`` is the median of the samples in ``[warmup_s, warmup_s + window_s)``, ``final`` the median of the
    samples in the last ``window_s`` seconds, ``peak`` the largest sample after warm-up; growth is
    ``(final - baseline) / baseline``. Medians keep one sample taken mid-batch from deciding the verdict.
    Processes missing from either window are left out. The ``total`` row sums the processes' RSS per sample; the
    breakdown keys (``<process>.anon``, ``<process>.shmem``, ``shm_pool``) get rows of their own.
    """
    import statistics

    rows = [dict(s) for s in samples]
    for row in rows:
        row["total"] = sum(v for k, v in row.items() if is_process_key(k))
    if not rows:
        return {}
    end = rows[-1]["t"]
    names = sorted({k for row in rows for k in row if k != "t"})
    out = {}
    for name in names:
        after = [r[name] for r in rows if r["t"] >= warmup_s and name in r]
        base = [r[name] for r in rows if warmup_s <= r["t"] < warmup_s + window_s and name in r]
        last = [r[name] for r in rows if r["t"] > end - window_s and name in r]
        if not base or not last:
            continue
        baseline, final = statistics.median(base), statistics.median(last)
        out[name] = {
            "baseline_mb": round(baseline / 2**20, 1),
            "final_mb": round(final / 2**20, 1),
            "peak_mb": round(max(after) / 2**20, 1),
            "growth_pct": round(100.0 * (final - baseline) / baseline, 2) if baseline else 0.0,
        }
    return out


def is_process_key(key: str) -> bool:
    """Whether a sample key is a process's RSS (not ``t``, a breakdown ``x.anon``/``x.shmem``, ``shm_pool``)."""
    return key not in ("t", "total", "shm_pool") and "." not in key


# ------------------------------------------------------------------------------------------- bursts


@dataclass(frozen=True)
class Outcome:
    """What one request got: ``status`` is ``"OK"`` or the server's status (``StatusCode.UNAVAILABLE``, ...)."""

    status: str
    message: str
    latency_s: float
    #: ``(caption, score)`` per row of an answered ``caption`` request
    captions: tuple[tuple[str, float], ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def caption(self) -> str | None:
        return self.captions[0][0] if self.captions else None

    @property
    def score(self) -> float | None:
        return self.captions[0][1] if self.captions else None


def caption_inputs(
    tc,
    images: Sequence[bytes],
    beam_size: int | None = None,
    max_length: int | None = None,
) -> list:
    """``caption`` inputs for one request of ``len(images)`` rows (tritonclient module ``tc``)."""
    import numpy as np

    rows = len(images)
    tensor = tc.InferInput("image", [rows, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[d] for d in images], dtype=np.object_).reshape(rows, 1))
    inputs = [tensor]
    for name, value in (("beam_size", beam_size), ("max_length", max_length)):
        if value is not None:
            setting = tc.InferInput(name, [rows, 1], "INT32")
            setting.set_data_from_numpy(np.full((rows, 1), value, dtype=np.int32))
            inputs.append(setting)
    return inputs


def fire(
    grpc_address: str,
    requests: Iterable[Sequence],
    *,
    model: str = "caption",
    timeout_s: float = 600.0,
    queue_timeout_us: int | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    client_timeout_s: float | None = None,
) -> list[Outcome]:
    """Send every request at once (asynchronous gRPC calls) and wait for all answers, at most ``timeout_s``.

    ``requests`` are lists of tritonclient.grpc ``InferInput`` (see :func:`caption_inputs`). Returns one
    :class:`Outcome` per request, in order; a request without an answer by then gets status ``"NO_ANSWER"``.
    ``queue_timeout_us`` sets the request's own queue timeout (the models allow overriding theirs);
    ``on_outcome`` is called with each outcome as it arrives (from tritonclient's callback thread);
    ``client_timeout_s`` makes the client give up on (cancel) each request after that many seconds.
    """
    import tritonclient.grpc as grpcclient

    requests = list(requests)
    outcomes: list[Outcome | None] = [None] * len(requests)
    remaining = threading.Semaphore(0)
    from client import with_api_key

    # The inference key, where the server wants one, from $CAPTION_API_KEY (or $CAPTION_API_KEY_FILE).
    client = with_api_key(grpcclient.InferenceServerClient(grpc_address), "grpc")
    extra = {} if queue_timeout_us is None else {"timeout": queue_timeout_us}
    if client_timeout_s is not None:
        extra["client_timeout"] = client_timeout_s

    def callback(index: int, start: float):
        def done(result, error):
            latency = time.monotonic() - start
            if error is None:
                outcome = Outcome("OK", "", latency, _captions(result, model))
            else:
                outcome = Outcome(str(error.status()), error.message() or str(error), latency)
            outcomes[index] = outcome
            if on_outcome is not None:
                on_outcome(outcome)
            remaining.release()

        return done

    try:
        for index, inputs in enumerate(requests):
            client.async_infer(model, list(inputs), callback(index, time.monotonic()), **extra)
        deadline = time.monotonic() + timeout_s
        for _ in requests:
            if not remaining.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
    finally:
        client.close()
    return [
        o if o is not None else Outcome("NO_ANSWER", f"no answer within {timeout_s} s", timeout_s)
        for o in outcomes
    ]


def _captions(result, model: str) -> tuple[tuple[str, float], ...]:
    if model != "caption":
        return ()
    texts, scores = result.as_numpy("caption"), result.as_numpy("score")
    return tuple(
        (t.decode("utf-8") if isinstance(t, bytes) else str(t), float(s))
        for t, s in zip(texts[:, 0], scores[:, 0], strict=True)
    )
