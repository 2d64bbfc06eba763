"""Soak test: steady load on the ``caption`` ensemble for a bounded time; zero failed requests, flat memory.

``make soak`` (default 10 minutes: ``SOAK_SECONDS``) runs this against a tritonserver it starts (the committed
``model_repository/``, the demo checkpoint unless ``OFA_MODEL_DIR`` is set, free 127.0.0.1 ports), or against one
already answering on ``--http-port``/``--grpc-port`` (its PID is found by its port). Meanwhile:

* ``--users`` closed-loop users (default 4) caption the sample images through ``client.CaptionClient`` with its
  retries (``--retries``, default the client's; 0 = none), half over gRPC and half over HTTP: a request that still
  fails after its retries is a failure, and the retries are counted apart, by cause (on a healthy server there are
  none: each one is a transient fault the client hid). Every request's bytes are distinct (the
  response cache cannot answer), except one in ``--repeat-every`` (default 10), which repeats an earlier image
  (the cache path); user 0 sends a broken image every ``--bad-every`` requests (default 10), which must be
  refused with INVALID_ARGUMENT (the error path) and is counted apart;
* the resident memory (RSS, from /proc) of tritonserver and of each Python backend stub is sampled every
  ``--interval`` seconds.

Verdict (exit 1 when missed): no failed request (client retries are reported, not failed), at least one request per user, the same stub processes at the
end (none died and was replaced), the server still ready, and for every process and the total: RSS at the end
(median of the last 30 s) at most ``--max-growth-pct`` (10 %) above RSS right after warm-up (median of the 30 s
after ``--warmup-seconds``, default 20 % of the run, at least 60 s). Prints a table (RSS every minute, the
verdict) and writes ``load_tests/results/soak.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import random
import sys
import threading
import time
from pathlib import Path

from load_tests import tool
from load_tests.corpus import UniqueImages, load_images
from load_tests.loadlib import METRICS_PACKAGES, ServerHandle, latency_summary, model_metrics_delta
from load_tests.reliabilitylib import (
    ClientRetries,
    RssSampler,
    format_retries,
    is_process_key,
    live_stubs,
    rss_growth,
    server_pid_on_port,
)

WINDOW_S = 30.0
MODELS = ("caption", "preprocess", "ofa")
#: How long the users may still be busy after the run's end: a request is bounded by the client timeout (180 s).
GRACE_S = 240.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The soak's options (after the server options every tool shares)."""
    env = os.environ.get
    p.add_argument("--seconds", type=float, default=float(env("SOAK_SECONDS", "600")), help="load duration")
    p.add_argument("--users", type=int, default=int(env("SOAK_USERS", "4")), help="closed-loop users")
    p.add_argument(
        "--warmup-seconds",
        type=float,
        default=None,
        help="memory baseline taken after this (default: 20%% of --seconds, at least 60 s)",
    )
    p.add_argument("--interval", type=float, default=5.0, help="RSS sampling interval (s)")
    p.add_argument("--max-growth-pct", type=float, default=float(env("SOAK_MAX_GROWTH_PCT", "10")))
    p.add_argument("--beam-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--max-length", type=int, default=None, help="default: the checkpoint's")
    p.add_argument(
        "--repeat-every", type=int, default=10, help="every Nth request repeats an image (0 = never)"
    )
    p.add_argument(
        "--bad-every", type=int, default=10, help="user 0 sends a broken image every Nth (0 = never)"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=None,
        help="CaptionClient retries of a request after a transient failure (default: the client's; 0 = none)",
    )
    p.add_argument(
        "--peak-rounds",
        type=int,
        default=3,
        help="first requests sent by all users at once (the largest batch steady load makes) before the run",
    )


def settle_arguments(args: argparse.Namespace) -> str | None:
    """Fill in the default ``--warmup-seconds``; the reason the options contradict each other, else ``None``."""
    if args.warmup_seconds is None:
        args.warmup_seconds = max(60.0, 0.2 * args.seconds)
    if args.seconds < args.warmup_seconds + 2 * WINDOW_S:
        return (
            f"--seconds must leave two {WINDOW_S:.0f} s windows after the warm-up ({args.warmup_seconds} s)"
        )
    if args.users < 1:
        return "--users must be at least 1"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The soak's arguments, settled; argparse refuses (exit 2) options that contradict each other."""
    return tool.parse_args(TOOL, argv)


def _log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Tally:
    """Thread-safe counts and latencies of the run."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.ok = self.cached = self.refused_as_expected = self.retries = 0
        self.per_user: dict[int, int] = {}
        self.failures: list[str] = []

    def add_ok(self, user: int, latency: float, repeat: bool) -> None:
        with self.lock:
            self.ok += 1
            self.cached += repeat
            self.latencies.append(latency)
            self.per_user[user] = self.per_user.get(user, 0) + 1

    def add_failure(self, text: str) -> None:
        with self.lock:
            self.failures.append(text)


def broken_images() -> list[bytes]:
    """Undecodable payloads for the error path (each must be refused with INVALID_ARGUMENT)."""
    rng = random.Random(0)
    return [rng.randbytes(2048), b"not an image at all", b"\x89PNG\r\n\x1a\n" + rng.randbytes(512)]


def user_loop(
    user: int,
    args,
    url: str,
    protocol: str,
    corpus: UniqueImages,
    deadline: float,
    tally: Tally,
    barrier: threading.Barrier,
):
    """Caption until ``deadline``: one request in flight (retried by the client after transient failures);
    every outcome is tallied, and the client's retries.

    The first ``--peak-rounds`` requests of all users start together (``barrier``), so that the batches steady
    load can produce at its largest are served during the warm-up: memory reaches its working-set high-water mark
    then, and growth measured afterwards is not the allocator reaching it later.
    """
    from client import CaptionClient, CaptionError, InvalidInputError

    broken = broken_images()
    sent: list[bytes] = []
    settings = {"beam_size": args.beam_size, "max_length": args.max_length}
    retries = {} if args.retries is None else {"retries": args.retries}
    with CaptionClient(url, protocol=protocol, timeout=180, **retries) as client:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            if n <= args.peak_rounds:
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.wait(timeout=300)
            if user == 0 and args.bad_every and n % args.bad_every == 0:
                data = broken[(n // args.bad_every) % len(broken)]
                try:
                    client.caption(data, **settings)
                    tally.add_failure(f"user {user}: a broken image was captioned")
                except InvalidInputError:
                    with tally.lock:
                        tally.refused_as_expected += 1
                except CaptionError as exc:
                    tally.add_failure(f"user {user} ({protocol}), broken image: {type(exc).__name__}: {exc}")
                continue
            repeat = bool(args.repeat_every and sent and n % args.repeat_every == 0)
            data = sent[-1] if repeat else corpus.next()[1]
            start = time.monotonic()
            try:
                client.caption(data, **settings)
            except CaptionError as exc:
                tally.add_failure(f"user {user} ({protocol}): {type(exc).__name__}: {exc}")
                continue
            tally.add_ok(user, time.monotonic() - start, repeat)
            if not repeat:
                sent = [data]
        with tally.lock:
            tally.retries += client.retry_count


def rss_table(samples: list[dict], every_s: float = 60.0) -> list[dict]:
    """One sample per ``every_s`` seconds (and the last one), in MB: each process's RSS, the total, the pools."""
    rows, next_t = [], 0.0
    for i, s in enumerate(samples):
        if s["t"] >= next_t or i == len(samples) - 1:
            row = {"t": s["t"]}
            row.update({k: round(v / 2**20, 1) for k, v in s.items() if is_process_key(k)})
            row["total"] = round(sum(v for k, v in row.items() if k != "t"), 1)
            row["shm_pool"] = round(s.get("shm_pool", 0) / 2**20, 1)
            rows.append(row)
            next_t = s["t"] + every_s
    return rows


def print_table(rows: list[dict]) -> None:
    names = [k for k in rows[0] if k != "t"]
    print(f"{'t (s)':>7} " + " ".join(f"{n:>14}" for n in names) + "   (RSS, MB)")
    for row in rows:
        print(f"{row['t']:>7.0f} " + " ".join(f"{row.get(n, float('nan')):>14.1f}" for n in names))


def server_stubs(server: ServerHandle) -> tuple[int, dict[str, int]]:
    """The server's PID (found by its port when this run did not start it) and ``{instance: pid}`` of its stubs;
    the run stops (exit 1) when either is missing: RSS is measured per process."""
    pid = server.pid or server_pid_on_port(server.http_port)
    if pid is None:
        raise SystemExit(f"cannot find the PID of the server on port {server.http_port} (needed for its RSS)")
    stubs = live_stubs(pid)
    if not stubs:
        raise SystemExit(
            f"process {pid} has no Python backend stubs: is it the tritonserver of this repository?"
        )
    return pid, stubs


def start_users(
    args: argparse.Namespace, server: ServerHandle, corpus: UniqueImages, tally: Tally, deadline: float
) -> list[threading.Thread]:
    """One thread per user, even users over gRPC and odd ones over HTTP, running :func:`user_loop`."""
    threads = []
    barrier = threading.Barrier(args.users)
    for user in range(args.users):
        protocol = "grpc" if user % 2 == 0 else "http"
        port = server.grpc_port if protocol == "grpc" else server.http_port
        url = f"{protocol}://{server.host}:{port}"
        thread = threading.Thread(
            target=user_loop,
            args=(user, args, url, protocol, corpus, deadline, tally, barrier),
            name=f"user-{user}",
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    return threads


def wait_for_users(
    threads: list[threading.Thread], tally: Tally, sampler: RssSampler, deadline: float
) -> None:
    """Wait until every user is done, logging progress once a minute; users still busy :data:`GRACE_S` after
    ``deadline`` are a failure."""
    last_report = time.monotonic()
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        if time.monotonic() - last_report >= 60:
            last_report = time.monotonic()
            with tally.lock:
                _log(
                    f"{tally.ok} ok, {tally.refused_as_expected} broken images refused, "
                    f"{len(tally.failures)} failed; RSS {sampler.samples[-1] if sampler.samples else '-'}"
                )
        if time.monotonic() > deadline + GRACE_S:
            tally.add_failure(f"users still busy {GRACE_S:.0f} s after the end")
            break


def run(args: argparse.Namespace, server: ServerHandle) -> dict:
    """The soak against ``server``: users for ``--seconds`` while RSS is sampled; the report with its checks."""
    pid, stubs_before = server_stubs(server)
    corpus = UniqueImages(load_images(args.image_dir))
    metrics_before = server.metrics()
    tally = Tally()
    sampler = RssSampler(pid, interval=args.interval)
    _log(
        f"{args.users} users for {args.seconds:.0f} s (warm-up {args.warmup_seconds:.0f} s) against pid {pid}, "
        f"stubs {stubs_before}"
    )
    sampler.start()
    with ClientRetries() as retry_log:
        deadline = time.monotonic() + args.seconds
        wait_for_users(start_users(args, server, corpus, tally, deadline), tally, sampler, deadline)
        sampler.sample()
        sampler.stop()
    stubs_after = live_stubs(pid)
    growth = rss_growth(sampler.samples, args.warmup_seconds, WINDOW_S)
    metrics_after = server.metrics()
    checks = {
        "no failed request": not tally.failures,
        "every user completed requests": all(tally.per_user.get(u, 0) > 0 for u in range(args.users)),
        "same stub processes": stubs_after == stubs_before,
        "server still ready": server.ready(),
        f"RSS growth under {args.max_growth_pct:g} % after warm-up": bool(growth)
        and all(
            g["growth_pct"] < args.max_growth_pct
            for name, g in growth.items()
            if is_process_key(name) or name == "total"
        ),
    }
    return {
        "kind": "soak",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("results_dir", "name")
        },
        "server_pid": pid,
        "stubs": {"before": stubs_before, "after": stubs_after},
        "requests": requests_report(args, tally, retry_log),
        "latency": latency_summary(tally.latencies),
        "models": {m: model_metrics_delta(metrics_before, metrics_after, m) for m in MODELS},
        "rss_growth": growth,
        "rss_every_minute_mb": rss_table(sampler.samples),
        "rss_samples": sampler.samples,
        "checks": checks,
    }


def requests_report(args: argparse.Namespace, tally: Tally, retry_log: ClientRetries) -> dict:
    """The ``requests`` part of the report: outcomes, retries by cause, throughput."""
    return {
        "total": tally.ok + tally.refused_as_expected + len(tally.failures),
        "ok": tally.ok,
        "of_which_repeats": tally.cached,
        "broken_refused_as_expected": tally.refused_as_expected,
        "failed": len(tally.failures),
        "failures": tally.failures[:50],
        "retries": tally.retries,
        "retries_by_cause": retry_log.summary()["by_cause"],
        "per_second": round(tally.ok / args.seconds, 3),
    }


def summarize(report: dict) -> None:
    """The RSS table, the requests, the client's retries and the RSS growth of every process."""
    print()
    print_table(report["rss_every_minute_mb"])
    print()
    r = report["requests"]
    print(
        f"requests: {r['ok']} ok ({r['of_which_repeats']} repeats), {r['broken_refused_as_expected']} broken images "
        f"refused as expected, {r['failed']} failed; {r['per_second']} captions/s; latency {report['latency']}"
    )
    retried = {"total": r["retries"], "by_cause": r["retries_by_cause"]}
    print(f"client retries (apart from failures): {format_retries(retried)}")
    print(f"{'RSS of':>22} {'after warm-up':>14} {'end':>8} {'peak':>8} {'growth':>8}")
    for name, g in report["rss_growth"].items():
        print(
            f"{name:>22} {g['baseline_mb']:>11.1f} MB {g['final_mb']:>5.1f} MB {g['peak_mb']:>5.1f} MB "
            f"{g['growth_pct']:>+7.2f}%"
        )
    for failure in r["failures"][:10]:
        print(f"FAILED: {failure}")


TOOL = tool.Tool(
    name="soak",
    description=__doc__.split("\n\n")[0],
    add_arguments=add_arguments,
    run=run,
    summarize=summarize,
    needs=METRICS_PACKAGES,
    check_arguments=settle_arguments,
)


def main(argv: list[str] | None = None) -> int:
    """``make soak``: the exit status (0 passed, 1 a check failed, 2 refused)."""
    return tool.main(TOOL, argv)


if __name__ == "__main__":
    sys.exit(main())
