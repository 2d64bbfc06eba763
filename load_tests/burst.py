"""Burst test: far more requests at once than the server holds; refusals must be fast, accepted work must finish.

``make burst`` runs this against a tritonserver it starts (the committed ``model_repository/`` and its queue
policy, the demo checkpoint unless ``OFA_MODEL_DIR`` is set, free 127.0.0.1 ports), or against one already
answering on ``--http-port``/``--grpc-port``. Two phases, every request with distinct image bytes (the response
cache cannot answer):

1. **raw burst**: ``--requests`` (default 200) one-image requests sent at once over gRPC, no retries. Expected:
   each is answered with a caption, refused at once with UNAVAILABLE "Exceeds maximum queue size" (a queue was
   full), or refused with UNAVAILABLE "Request timeout expired" after waiting the queue timeout (60 s); nothing
   else, at least one refusal, refusals fast (median under ``--max-refusal-p50-s``, default 1 s; a request
   refused by ``ofa``'s full queue has been decoded by ``preprocess`` first, seconds on a CPU) and every one of
   them before the first caption.
2. **retrying clients**: ``--client-requests`` (default 96) images through ``client.CaptionClient.caption_many``
   with as many in flight (past the 16 executing + 64 waiting that ``ofa`` holds), ``--retries``, ``--backoff``
   and ``--max-backoff`` (exponential backoff with full jitter) within ``--timeout`` per image. Expected: every
   image captioned; the refusals the client absorbed are counted: every attempt by outcome, and the client's
   retries by cause, apart from failures.

Afterwards the server must be ready with the same Python backend stub processes. Prints a summary and writes
``load_tests/results/burst.json``; exits 1 when an expectation is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from load_tests import tool
from load_tests.corpus import UniqueImages, load_images
from load_tests.loadlib import METRICS_PACKAGES, ServerHandle, latency_summary, model_metrics_delta
from load_tests.reliabilitylib import (
    ClientRetries,
    Outcome,
    caption_inputs,
    fire,
    format_retries,
    live_stubs,
    server_pid_on_port,
)

QUEUE_FULL = "Exceeds maximum queue size"
QUEUE_TIMEOUT = "Request timeout expired"
MODELS = ("caption", "preprocess", "ofa")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The burst's options (after the server options every tool shares)."""
    env = os.environ.get
    p.add_argument("--requests", type=int, default=int(env("BURST_REQUESTS", "200")), help="phase 1 size")
    p.add_argument(
        "--client-requests", type=int, default=int(env("BURST_CLIENT_REQUESTS", "96")), help="phase 2 size"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=100,
        help="most CaptionClient retries per image in phase 2 (the --timeout deadline usually ends them first)",
    )
    p.add_argument("--backoff", type=float, default=1.0, help="CaptionClient backoff (s) in phase 2")
    p.add_argument(
        "--max-backoff", type=float, default=30.0, help="CaptionClient's longest wait (s) in phase 2"
    )
    p.add_argument(
        "--max-refusal-p50-s",
        type=float,
        default=1.0,
        help="median latency of queue-full refusals must be below this",
    )
    p.add_argument("--beam-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--max-length", type=int, default=None, help="default: the checkpoint's")
    p.add_argument(
        "--timeout", type=float, default=900.0, help="bound on each phase (s); phase 2's deadline per image"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The burst's arguments (the shared server options and its own)."""
    return tool.parse_args(TOOL, argv)


def _log(message: str) -> None:
    print(f"[burst {time.strftime('%H:%M:%S')}] {message}", flush=True)


def outcome_kind(outcome: Outcome) -> str:
    """What a phase 1 request got: captioned, one of the two UNAVAILABLE refusals, or something else."""
    if outcome.ok:
        return "captioned"
    if outcome.status == "StatusCode.UNAVAILABLE" and QUEUE_FULL in outcome.message:
        return "refused: queue full"
    if outcome.status == "StatusCode.UNAVAILABLE" and QUEUE_TIMEOUT in outcome.message:
        return "refused: queue timeout"
    return f"other: {outcome.status} {outcome.message[:120]}"


def raw_burst_checks(args: argparse.Namespace, kinds: list[str], by_kind: dict[str, list[float]]) -> dict:
    """Phase 1's expectations from the outcome of every request and the latencies of each kind."""
    full = by_kind.get("refused: queue full", [])
    captioned = by_kind.get("captioned", [])
    return {
        "only captions and UNAVAILABLE refusals": all(not k.startswith("other") for k in kinds),
        "at least one refusal": bool(full),
        f"refusals fast (median < {args.max_refusal_p50_s:g} s)": bool(full)
        and latency_summary(full)["p50_ms"] < 1000 * args.max_refusal_p50_s,
        "every queue-full refusal before the first caption": bool(full)
        and (not captioned or max(full) < min(captioned)),
        "queue-timeout refusals only after the 60 s timeout": all(
            t >= 59 for t in by_kind.get("refused: queue timeout", [])
        ),
    }


def raw_burst(args: argparse.Namespace, server: ServerHandle, corpus: UniqueImages) -> dict:
    """Phase 1: ``--requests`` one-image requests at once over gRPC, no retries; every outcome by kind."""
    import tritonclient.grpc as grpcclient

    settings = {"beam_size": args.beam_size, "max_length": args.max_length}
    requests = [caption_inputs(grpcclient, [corpus.next()[1]], **settings) for _ in range(args.requests)]
    before = server.metrics()
    with tool.Stopwatch() as watch:
        outcomes = fire(server.grpc_address, requests, timeout_s=args.timeout)
    after = server.metrics()
    kinds = [outcome_kind(o) for o in outcomes]
    by_kind = {k: [o.latency_s for o, kk in zip(outcomes, kinds, strict=True) if kk == k] for k in set(kinds)}
    return {
        "requests": args.requests,
        "wall_s": round(watch.seconds, 2),
        "counts": dict(Counter(kinds)),
        "latency": {k: {"min_ms": round(1000 * min(v), 2), **latency_summary(v)} for k, v in by_kind.items()},
        "models": {m: model_metrics_delta(before, after, m) for m in MODELS},
        "checks": raw_burst_checks(args, kinds, by_kind),
    }


@contextlib.contextmanager
def counted_attempts() -> Iterator[Counter]:
    """Inside the block, every gRPC inference of this process is counted by outcome (captioned, queue full,
    queue timeout, other error) in the yielded counter: the attempts behind the client's retries."""
    import tritonclient.grpc as grpcclient

    attempts: Counter = Counter()
    lock = threading.Lock()
    original = grpcclient.InferenceServerClient.infer

    def counting(self, *a, **kw):
        try:
            result = original(self, *a, **kw)
        except Exception as exc:
            message = (exc.message() if hasattr(exc, "message") else str(exc)) or ""
            key = (
                "queue full"
                if QUEUE_FULL in message
                else "queue timeout"
                if QUEUE_TIMEOUT in message
                else None
            )
            with lock:
                attempts[key or "other error"] += 1
            raise
        with lock:
            attempts["captioned"] += 1
        return result

    grpcclient.InferenceServerClient.infer = counting
    try:
        yield attempts
    finally:
        grpcclient.InferenceServerClient.infer = original


def retrying_clients(args: argparse.Namespace, server: ServerHandle, corpus: UniqueImages) -> dict:
    """Phase 2: CaptionClient.caption_many with ``--client-requests`` in flight; every attempt is counted."""
    from client import Caption, CaptionClient

    images = [corpus.next()[1] for _ in range(args.client_requests)]
    client = CaptionClient(
        f"grpc://{server.grpc_address}",
        retries=args.retries,
        backoff=args.backoff,
        max_backoff=args.max_backoff,
        timeout=args.timeout,
        deadline=args.timeout,
    )
    with tool.Stopwatch() as watch, counted_attempts() as attempts, ClientRetries() as retried, client:
        results = client.caption_many(
            images, concurrency=args.client_requests, beam_size=args.beam_size, max_length=args.max_length
        )
    failed = [f"{type(r).__name__}: {r}" for r in results if not isinstance(r, Caption)]
    return {
        "requests": args.client_requests,
        "max_retries": args.retries,
        "backoff_s": args.backoff,
        "max_backoff_s": args.max_backoff,
        "wall_s": round(watch.seconds, 2),
        "captioned": len(results) - len(failed),
        "failed": failed[:20],
        "retries": client.retry_count,
        "retries_by_cause": retried.summary()["by_cause"],
        "attempts": dict(attempts),
        "checks": {"every image captioned": not failed},
    }


def run(args: argparse.Namespace, server: ServerHandle) -> dict:
    """Both phases against ``server``, then the server's own checks (still ready, the same stubs)."""
    corpus = UniqueImages(load_images(args.image_dir))
    pid = server.pid or server_pid_on_port(server.http_port)
    stubs_before = live_stubs(pid)
    _log(f"phase 1: {args.requests} requests at once (gRPC, no retries)")
    phase1 = raw_burst(args, server, corpus)
    _log(f"phase 1: {phase1['counts']} in {phase1['wall_s']} s")
    _log(
        f"phase 2: {args.client_requests} images through CaptionClient, all in flight, retries {args.retries}"
    )
    phase2 = retrying_clients(args, server, corpus)
    _log(
        f"phase 2: {phase2['captioned']} captioned, {len(phase2['failed'])} failed, {phase2['retries']} "
        f"client retries; attempts {phase2['attempts']} in {phase2['wall_s']} s"
    )
    stubs_after = live_stubs(pid)
    server_checks = {"server still ready": server.ready(), "same stub processes": stubs_after == stubs_before}
    return {
        "kind": "burst",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "raw_burst": phase1,
        "retrying_clients": phase2,
        "server": {"stubs_before": stubs_before, "stubs_after": stubs_after, "checks": server_checks},
        "checks": {**phase1["checks"], **phase2["checks"], **server_checks},
    }


def summarize(report: dict) -> None:
    """Phase 1's outcomes with their latencies, phase 2's captions, attempts and client retries."""
    phase1, phase2 = report["raw_burst"], report["retrying_clients"]
    print()
    print(f"phase 1: {phase1['requests']} requests at once, {phase1['wall_s']} s")
    print(f"{'outcome':>26} {'count':>6} {'min ms':>9} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    for k, n in sorted(phase1["counts"].items()):
        lat = phase1["latency"][k]
        print(
            f"{k[:26]:>26} {n:>6} {lat['min_ms']:>9.0f} {lat['p50_ms']:>9.0f} {lat['p95_ms']:>9.0f} "
            f"{lat['max_ms']:>9.0f}"
        )
    print(
        f"phase 2: {phase2['captioned']}/{phase2['requests']} captioned through CaptionClient in "
        f"{phase2['wall_s']} s; attempts {phase2['attempts']}"
    )
    retried = {"total": phase2["retries"], "by_cause": phase2["retries_by_cause"]}
    print(f"phase 2 client retries (apart from failures): {format_retries(retried)}")


TOOL = tool.Tool(
    name="burst",
    description=__doc__.split("\n\n")[0],
    add_arguments=add_arguments,
    run=run,
    summarize=summarize,
    needs=METRICS_PACKAGES,
)


def main(argv: list[str] | None = None) -> int:
    """``make burst``: the exit status (0 passed, 1 a check failed, 2 refused)."""
    return tool.main(TOOL, argv)


if __name__ == "__main__":
    sys.exit(main())
