"""The served phases of ``make bench``: the ``caption`` ensemble over gRPC, closed loop and open loop.

(c) closed loop: N threads, one request in flight each, N = ``--concurrency``; Triton's metrics over each phase
    give ``ofa``'s average executed batch and its queue against compute time;
(d) open loop: requests at a constant arrival rate (:mod:`openloop`), one rate after the other, latency counted
    from each request's due time; the curve (p50/p99 against the offered rate), the highest rate held with p99
    under a bound derived from the engine's own latency, and its plot.

Every request carries distinct bytes (``corpus.UniqueImages``), so Triton's response cache cannot answer.
Requests go over raw tritonclient, each sent once: a benchmark measures the server, so a failure is counted and
reported as one (``client.CaptionClient`` would retry it, fold the wait into the latency and hide it); there are
no client-side retries to report.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from load_tests import tool
from load_tests.bench_report import display_path, ints, log, phase_result
from load_tests.corpus import UniqueImages
from load_tests.loadlib import (
    REPO_ROOT,
    assign_free_ports,
    model_metrics_delta,
    server_from_args,
    settled_metrics,
)
from load_tests.openloop import highest_held, plot_curve, rate_row, rates_from, run_rate
from load_tests.reliabilitylib import caption_inputs

#: Default open-loop bound: this many times the engine's in-process latency at its best batch (one call). An
#: arrival at a busy, stable server waits for the batch in progress, then runs in the next one: about two batch
#: times; more means requests queue faster than batches drain them.
OPEN_LOOP_BOUND_FACTOR = 2.0


def caption_request(grpcclient, corpus: UniqueImages, args: argparse.Namespace):
    """``request(client)``: one blocking ``caption`` call on the next (distinct) image."""
    outputs = [grpcclient.InferRequestedOutput("caption"), grpcclient.InferRequestedOutput("score")]

    def request(client) -> None:
        inputs = caption_inputs(grpcclient, [corpus.next()[1]], args.beam_size, args.max_length)
        result = client.infer("caption", inputs, outputs=outputs, client_timeout=120)
        if result.as_numpy("caption") is None:
            raise RuntimeError("response without caption")

    return request


def served_phase(server, corpus: UniqueImages, concurrency: int, args: argparse.Namespace) -> dict:
    """(c) One closed-loop phase: ``concurrency`` threads, each with one gRPC request in flight."""
    import tritonclient.grpc as grpcclient

    from client import with_api_key

    request = caption_request(grpcclient, corpus, args)

    # The inference key, where the server wants one, from $CAPTION_API_KEY (or $CAPTION_API_KEY_FILE).
    clients = [
        with_api_key(grpcclient.InferenceServerClient(server.grpc_address), "grpc")
        for _ in range(concurrency)
    ]
    try:
        # Warm-up (untimed, not in the metrics delta): each thread's channel and the server's batch shapes.
        _run_threads(clients, lambda c, i: request(c), args.warmup * concurrency, float("inf"))
        before = settled_metrics(server.host, server.metrics_port)
        lat, failures, wall = _run_threads(
            clients,
            lambda c, i: request(c),
            args.served_requests,
            args.phase_seconds,
            min_total=max(args.min_served_requests, 2 * concurrency),
        )
        after = settled_metrics(server.host, server.metrics_port)
    finally:
        for client in clients:
            client.close()
    ofa = model_metrics_delta(before, after, "ofa")
    pre = model_metrics_delta(before, after, "preprocess")
    ens = model_metrics_delta(before, after, "caption")
    return phase_result(
        "served",
        f"gRPC, concurrency {concurrency}",
        lat,
        len(lat),
        wall,
        concurrency=concurrency,
        failures=failures,
        ofa_avg_batch=ofa["avg_batch"],
        ofa_queue_ms=ofa["queue_ms"],
        ofa_compute_ms=ofa["compute_ms"],
        preprocess_avg_batch=pre["avg_batch"],
        preprocess_queue_ms=pre["queue_ms"],
        preprocess_compute_ms=pre["compute_ms"],
        cache_hits=ens["nv_cache_num_hits_per_model"],
        metrics={"ofa": ofa, "preprocess": pre, "caption": ens},
    )


def _run_threads(
    clients, fn, max_total: int, seconds: float, min_total: int = 0
) -> tuple[list[float], int, float]:
    """Each client in its own thread calls ``fn(client, i)`` in a loop; bounded by count and time.

    All threads start their first call together (a barrier, as a load generator's N concurrent slots do), so a
    phase does not begin with the clients' start-up spread over several batches. A thread starts another call
    while fewer than ``max_total`` were started and either less than ``seconds`` passed or fewer than
    ``min_total`` were started. Returns successful latencies, failures, wall time.
    """
    lock = threading.Lock()
    started = [0]
    latencies: list[float] = []
    failures = [0]
    errors: list[str] = []
    watch = tool.Stopwatch()
    barrier = threading.Barrier(len(clients), action=watch.restart)  # the phase starts when all threads do

    def worker(client) -> None:
        barrier.wait()
        while True:
            with lock:
                n = started[0]
                if n >= max_total or (watch.seconds > seconds and n >= min_total):
                    return
                started[0] += 1
            try:
                _, call_s = tool.timed(fn, client, n)
            except Exception as exc:  # counted and reported, never hidden
                with lock:
                    failures[0] += 1
                    if len(errors) < 3:
                        errors.append(repr(exc))
                continue
            with lock:
                latencies.append(call_s)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = watch.seconds
    for e in errors:
        log(f"request failed: {e}")
    return latencies, failures[0], wall


def bench_served(
    corpus: UniqueImages, args: argparse.Namespace, engine_rows: list[dict]
) -> tuple[list[dict], dict, dict | None]:
    """(c) Start (or use) the server, then one closed-loop phase per concurrency level, then the open-loop curve
    (unless ``--skip-open-loop``). Returns the closed-loop rows, the server's description and the open loop."""
    assign_free_ports(args)
    rows = []
    open_loop = None
    with server_from_args(args) as server:
        repository = Path(args.model_repository) if args.model_repository else REPO_ROOT / "model_repository"
        info = {
            "started_by_bench": server.started,
            "ports": [args.http_port, args.grpc_port, args.metrics_port],
            "model_repository": display_path(repository),
            "server_env": args.server_env,
            "configs": model_configs(repository),
        }
        log(f"served: server {'started' if server.started else 'found'} on {server.grpc_address}")
        for concurrency in ints(args.concurrency) if not args.skip_closed_loop else []:
            row = served_phase(server, corpus, concurrency, args)
            rows.append(row)
            log(
                f"served c={concurrency}: {row['images_per_s']} images/s, p50 {row['p50_ms']} ms, "
                f"ofa batch {row['ofa_avg_batch']}, queue {row['ofa_queue_ms']} ms / compute "
                f"{row['ofa_compute_ms']} ms, failures {row['failures']}, cache hits {row['cache_hits']}"
            )
        if not args.skip_open_loop:
            open_loop = open_loop_curve(server, corpus, args, engine_rows)
    return rows, info, open_loop


def model_configs(repository: Path) -> dict[str, str]:
    """The batching-related lines of each config.pbtxt, for the record."""
    keys = ("max_batch_size", "max_queue_delay", "preferred_batch_size", "count", "kind", "torch_threads")
    out = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        lines, in_threads = [], False
        for line in config.read_text().splitlines():
            text = line.strip()
            if text.startswith("#"):
                continue
            if in_threads and "string_value" in text:
                lines.append(f"torch_threads={text}")
                in_threads = False
            if '"torch_threads"' in text:
                in_threads = True
            elif any(text.startswith(k) for k in keys):
                lines.append(text)
        out[config.parent.name] = "; ".join(lines)
    return out


def open_loop_bound(args: argparse.Namespace, engine_rows: list[dict]) -> tuple[float, str]:
    """The p99 bound of the open loop in ms, and where it comes from.

    ``--open-loop-p99-ms`` when given; else ``--open-loop-factor`` (default 2) x the engine's p50 per call at its
    best-throughput batch, measured in-process earlier in this run.
    """
    if args.open_loop_p99_ms:
        return float(args.open_loop_p99_ms), "--open-loop-p99-ms"
    engines = [r for r in engine_rows if r["path"] == "engine" and r.get("p50_ms")]
    if not engines:
        raise SystemExit(
            "the open loop needs a latency bound: give --open-loop-p99-ms, or let the engine phase run "
            "(the bound is derived from its latency)"
        )
    best = max(engines, key=lambda r: r["images_per_s"] or 0)
    bound = args.open_loop_factor * best["p50_ms"]
    return (
        bound,
        f"{args.open_loop_factor:g} x the engine's p50 at batch {best['batch']} ({best['p50_ms']:.0f} ms)",
    )


def _async_sender(grpcclient, client, corpus: UniqueImages, args: argparse.Namespace):
    """``start(i, done)`` for :func:`openloop.run_rate`: one asynchronous ``caption`` request of a fresh image."""
    outputs = [grpcclient.InferRequestedOutput("caption"), grpcclient.InferRequestedOutput("score")]

    def start(i: int, done) -> None:
        inputs = caption_inputs(grpcclient, [corpus.next()[1]], args.beam_size, args.max_length)

        def callback(result, error) -> None:
            if error is None and result.as_numpy("caption") is None:
                error = RuntimeError("response without caption")
            done(error)

        client.async_infer("caption", inputs, callback, outputs=outputs, client_timeout=120)

    return start


def _rate_row(server, start, rate: float, bound_ms: float, args: argparse.Namespace) -> dict:
    """One offered rate: the open-loop run, its row and Triton's metrics over it."""
    before = settled_metrics(server.host, server.metrics_port)
    run = run_rate(
        start, rate, args.open_loop_seconds, max_in_flight=args.open_loop_max_in_flight, drain_s=150
    )
    after = settled_metrics(server.host, server.metrics_port)
    row = rate_row(run, bound_ms)
    ofa = model_metrics_delta(before, after, "ofa")
    row.update(
        ofa_avg_batch=ofa["avg_batch"],
        ofa_queue_ms=ofa["queue_ms"],
        cache_hits=model_metrics_delta(before, after, "caption")["nv_cache_num_hits_per_model"],
    )
    log(
        f"open loop {rate:g}/s for {args.open_loop_seconds:g} s: answered {row['achieved_per_s']}/s, "
        f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms (bound {bound_ms:.0f}), "
        f"{'held' if row['held'] else 'NOT held: ' + '; '.join(row['why_not_held'])}"
    )
    return row


def open_loop_curve(server, corpus: UniqueImages, args: argparse.Namespace, engine_rows: list[dict]) -> dict:
    """(d) One open-loop run per offered rate; the curve, the highest rate held and its plot."""
    import tritonclient.grpc as grpcclient

    from client import with_api_key

    engines = [r for r in engine_rows if r["path"] == "engine"]
    reference_rate = max((r["images_per_s"] or 0 for r in engines), default=None) or None
    rates = rates_from(args.open_loop_rates, args.open_loop_fractions, reference_rate)
    bound_ms, source = open_loop_bound(args, engine_rows)
    client = with_api_key(grpcclient.InferenceServerClient(server.grpc_address), "grpc")  # $CAPTION_API_KEY
    start = _async_sender(grpcclient, client, corpus, args)
    try:
        request = caption_request(grpcclient, corpus, args)
        for _ in range(args.warmup):
            request(client)
        rows = [_rate_row(server, start, rate, bound_ms, args) for rate in rates]
    finally:
        client.close()
    held = highest_held(rows)
    png = Path(args.results_dir) / f"{args.name}_open_loop.png"
    plot_curve(
        rows,
        png,
        f"caption ensemble, open loop over gRPC ({args.open_loop_seconds:g} s per rate)",
        reference_rate=reference_rate,
    )
    log(f"open loop: highest rate held {held if held is not None else 'none'}/s; plot {png}")
    return {
        "rows": rows,
        "p99_bound_ms": round(bound_ms, 2),
        "bound_source": source,
        "highest_held_per_s": held,
        "reference_rate": reference_rate,
        "seconds_per_rate": args.open_loop_seconds,
        "plot": display_path(png),
    }
