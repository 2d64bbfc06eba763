#!/usr/bin/env python
"""``make bench``: ModelScope's reference vs the engine in-process vs the served ``caption`` ensemble.

One run, one machine, the same images and the same generation settings for every path:

(a) ``reference``: ModelScope's OFA in-process (``tests/reference.py``), sequential, one image per call, on a
    few images only (it is slow);
(b) ``engine``: ``ofa_captioning.Captioner`` in-process on encoded bytes (decode + preprocess + generate), at
    batch 1 and at batches 4, 8 and 16; the best batch is the engine's best throughput;
(c) ``served``: the ``caption`` ensemble over gRPC at concurrency 1, 4, 8 and 16 (closed loop: N threads, one
    request in flight each), on a server this script starts with ``ofa_serving``'s launcher (or the one given
    with ``--grpc-port``/``--http-port``/``--metrics-port`` and ``--no-start``). Every request carries distinct
    bytes (a nonce after the encoded image, see ``loadlib.UniqueImages``), so Triton's response cache cannot
    answer; the cache hits of each phase are recorded to show it.

For every phase: images/s and p50/p95/p99 latency (per call: one image for (a), (c) and engine batch 1; one
batch for engine batch B). For served phases, from Triton's metrics (delta over the phase): ``ofa``'s average
executed batch size (``nv_inference_count / nv_inference_exec_count``) and its queue time against compute time
per request (``nv_inference_queue_duration_us``, ``nv_inference_compute_infer_duration_us``). Ratios between
the paths and the serving targets (served throughput at concurrency 8 >= 90 % of the engine's best; served p50
at concurrency 1 <= 1.15x the engine's batch-1 latency) are checked.

Writes ``load_tests/results/bench.json`` and ``bench.md`` (the table the README shows).
Each phase is bounded by a number of calls and by ``--phase-seconds``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadlib import (  # noqa: E402
    REPO_ROOT,
    UniqueImages,
    add_server_arguments,
    assign_free_ports,
    ensure_import_paths,
    latency_summary,
    load_images,
    model_metrics_delta,
    resolve_model_dir,
    server_from_args,
    settled_metrics,
)

ensure_import_paths()

TARGET_THROUGHPUT_RATIO = 0.90  # served images/s at concurrency 8 vs the engine's best in-process
TARGET_LATENCY_RATIO = 1.15  # served p50 at concurrency 1 vs the engine's batch-1 p50


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_arguments(p, "bench")
    p.add_argument("--beam-size", type=int, default=None, help="for every path (default: the checkpoint's)")
    p.add_argument("--max-length", type=int, default=None, help="for every path (default: the checkpoint's)")
    p.add_argument("--reference-images", type=int, default=6, help="images for the reference (0 = skip it)")
    p.add_argument("--engine-images", type=int, default=24, help="calls of the engine at batch 1")
    p.add_argument("--batches", default="4,8,16", help="engine batch sizes besides 1")
    p.add_argument("--batch-images", type=int, default=48, help="images per engine batch size (rounded up)")
    p.add_argument("--concurrency", default="1,4,8,16", help="served concurrency levels")
    p.add_argument("--served-requests", type=int, default=160, help="max requests per served phase")
    p.add_argument(
        "--min-served-requests", type=int, default=24, help="requests per phase even past the time"
    )
    p.add_argument("--phase-seconds", type=float, default=30.0, help="time bound of each phase")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each phase (x concurrency)")
    p.add_argument(
        "--torch-threads", type=int, default=0, help="torch threads in-process (0 = torch default)"
    )
    p.add_argument(
        "--device",
        default=env("OFA_DEVICE", "auto"),
        choices=("auto", "cpu", "cuda"),
        help="engine device in-process, resolved as the server resolves OFA_DEVICE (auto: CUDA if available)",
    )
    p.add_argument(
        "--dtype",
        default=env("OFA_DTYPE", "auto"),
        choices=("auto", "float32", "float16", "bfloat16"),
        help="engine dtype in-process, as the server's OFA_DTYPE (auto: float16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--skip-served", action="store_true")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--check", action="store_true", help="exit 1 when a serving target is missed")
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed_calls(
    call: Callable[[int], int], max_calls: int, seconds: float, min_calls: int = 1
) -> tuple[list[float], int, float]:
    """Run ``call(i)`` (returns images done) sequentially until ``max_calls`` or ``seconds`` (after ``min_calls``).

    Returns per-call latencies (s), images done and the wall time.
    """
    latencies, images = [], 0
    start = time.perf_counter()
    for i in range(max_calls):
        if i >= min_calls and time.perf_counter() - start > seconds:
            break
        t0 = time.perf_counter()
        images += call(i)
        latencies.append(time.perf_counter() - t0)
    return latencies, images, time.perf_counter() - start


def phase_result(path: str, setting: str, latencies: list[float], images: int, wall: float, **extra) -> dict:
    """One row of the results: throughput and latency percentiles of a phase."""
    return {
        "path": path,
        "setting": setting,
        "images": images,
        "calls": len(latencies),
        "wall_s": round(wall, 3),
        "images_per_s": round(images / wall, 3) if wall > 0 else None,
        **latency_summary(latencies),
        **extra,
    }


# ---------------------------------------------------------------------------------------------- phases


def bench_reference(model_dir: Path, images: list[bytes], args: argparse.Namespace) -> list[dict]:
    """(a) ModelScope's OFA in-process, sequential, one image per call."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests.reference import Reference

    _log("reference: loading ModelScope's OFA")
    t0 = time.perf_counter()
    ref = Reference(model_dir)
    _log(f"reference: loaded in {time.perf_counter() - t0:.1f} s; warm-up")
    ref.caption_images(images[:1], beam_size=args.beam_size, max_length=args.max_length)
    n = min(args.reference_images, len(images))

    def call(i: int) -> int:
        ref.caption_images([images[i % len(images)]], beam_size=args.beam_size, max_length=args.max_length)
        return 1

    lat, done, wall = timed_calls(call, n, args.phase_seconds * 2)
    row = phase_result("reference", "ModelScope in-process, batch 1", lat, done, wall)
    _log(f"reference: {row['images_per_s']} images/s, p50 {row['p50_ms']} ms")
    return [row]


def bench_engine(model_dir: Path, images: list[bytes], args: argparse.Namespace) -> list[dict]:
    """(b) The engine in-process on encoded bytes, batch 1 then each of ``--batches``."""
    import torch

    from ofa_captioning.captioner import Captioner
    from ofa_serving.settings import resolve_device, resolve_dtype

    device = resolve_device(args.device, torch.cuda.is_available())
    dtype = resolve_dtype(args.dtype, device)
    _log(f"engine: loading on {device} ({dtype})")
    captioner = Captioner.from_pretrained(model_dir, device=device, dtype=dtype)
    kwargs = {"beam_size": args.beam_size, "max_length": args.max_length}
    rows = []
    captioner.caption(images[:1], **kwargs)  # warm-up

    def one(i: int) -> int:
        captioner.caption([images[i % len(images)]], **kwargs)
        return 1

    lat, done, wall = timed_calls(one, args.engine_images, args.phase_seconds)
    rows.append(phase_result("engine", "in-process, batch 1", lat, done, wall, batch=1))
    _log(f"engine batch 1: {rows[-1]['images_per_s']} images/s, p50 {rows[-1]['p50_ms']} ms")
    for batch in _ints(args.batches):
        calls = max(2, -(-args.batch_images // batch))

        def many(i: int, batch: int = batch) -> int:
            chunk = [images[(i * batch + k) % len(images)] for k in range(batch)]
            return len(captioner.caption(chunk, **kwargs))

        many(0)  # warm-up at this shape
        lat, done, wall = timed_calls(many, calls, args.phase_seconds, min_calls=2)
        rows.append(phase_result("engine", f"in-process, batch {batch}", lat, done, wall, batch=batch))
        _log(f"engine batch {batch}: {rows[-1]['images_per_s']} images/s, p50 {rows[-1]['p50_ms']} ms/batch")
    return rows


def served_phase(server, corpus: UniqueImages, concurrency: int, args: argparse.Namespace) -> dict:
    """(c) One closed-loop phase: ``concurrency`` threads, each with one gRPC request in flight."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    settings = {k: v for k, v in (("beam_size", args.beam_size), ("max_length", args.max_length)) if v}
    outputs = [grpcclient.InferRequestedOutput("caption"), grpcclient.InferRequestedOutput("score")]

    def request(client) -> None:
        _name, data = corpus.next()
        image = grpcclient.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        inputs = [image]
        for name, value in settings.items():
            tensor = grpcclient.InferInput(name, [1, 1], "INT32")
            tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
            inputs.append(tensor)
        result = client.infer("caption", inputs, outputs=outputs, client_timeout=120)
        if result.as_numpy("caption") is None:
            raise RuntimeError("response without caption")

    clients = [grpcclient.InferenceServerClient(server.grpc_address) for _ in range(concurrency)]
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
    t_start = [time.perf_counter()]
    barrier = threading.Barrier(len(clients), action=lambda: t_start.__setitem__(0, time.perf_counter()))

    def worker(client) -> None:
        barrier.wait()
        while True:
            with lock:
                n = started[0]
                elapsed = time.perf_counter() - t_start[0]
                if n >= max_total or (elapsed > seconds and n >= min_total):
                    return
                started[0] += 1
            t0 = time.perf_counter()
            try:
                fn(client, n)
            except Exception as exc:  # counted and reported, never hidden
                with lock:
                    failures[0] += 1
                    if len(errors) < 3:
                        errors.append(repr(exc))
                continue
            dt_s = time.perf_counter() - t0
            with lock:
                latencies.append(dt_s)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start[0]
    for e in errors:
        _log(f"request failed: {e}")
    return latencies, failures[0], wall


def bench_served(corpus: UniqueImages, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """(c) Start (or use) the server, then one phase per concurrency level."""
    assign_free_ports(args)
    rows = []
    with server_from_args(args) as server:
        repository = Path(args.model_repository) if args.model_repository else REPO_ROOT / "model_repository"
        info = {
            "started_by_bench": server.started,
            "ports": [args.http_port, args.grpc_port, args.metrics_port],
            "model_repository": _display_path(repository),
            "server_env": args.server_env,
            "configs": model_configs(repository),
        }
        _log(f"served: server {'started' if server.started else 'found'} on {server.grpc_address}")
        for concurrency in _ints(args.concurrency):
            row = served_phase(server, corpus, concurrency, args)
            rows.append(row)
            _log(
                f"served c={concurrency}: {row['images_per_s']} images/s, p50 {row['p50_ms']} ms, "
                f"ofa batch {row['ofa_avg_batch']}, queue {row['ofa_queue_ms']} ms / compute "
                f"{row['ofa_compute_ms']} ms, failures {row['failures']}, cache hits {row['cache_hits']}"
            )
    return rows, info


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


# --------------------------------------------------------------------------------------------- reports


def summarize(rows: list[dict]) -> dict:
    """Ratios between the paths and the serving targets."""

    def find(path: str, **match) -> dict | None:
        for row in rows:
            if row["path"] == path and all(row.get(k) == v for k, v in match.items()):
                return row
        return None

    ref = find("reference")
    engine1 = find("engine", batch=1)
    engines = [r for r in rows if r["path"] == "engine"]
    best = max(engines, key=lambda r: r["images_per_s"] or 0) if engines else None
    served = [r for r in rows if r["path"] == "served"]
    served_best = max(served, key=lambda r: r["images_per_s"] or 0) if served else None
    c1, c8 = find("served", concurrency=1), find("served", concurrency=8)

    def ratio(a, b) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    out = {
        "engine_best": best["setting"] if best else None,
        "engine_best_images_per_s": best["images_per_s"] if best else None,
        "served_best": served_best["setting"] if served_best else None,
        "engine_batch1_vs_reference": ratio(engine1 and engine1["images_per_s"], ref and ref["images_per_s"]),
        "engine_best_vs_reference": ratio(best and best["images_per_s"], ref and ref["images_per_s"]),
        "served_best_vs_reference": ratio(
            served_best and served_best["images_per_s"], ref and ref["images_per_s"]
        ),
        "served_c8_vs_engine_best": ratio(c8 and c8["images_per_s"], best and best["images_per_s"]),
        "served_c1_p50_vs_engine_batch1_p50": ratio(c1 and c1["p50_ms"], engine1 and engine1["p50_ms"]),
    }
    for row in rows:
        row["vs_reference"] = ratio(row["images_per_s"], ref and ref["images_per_s"])
        row["vs_engine_best"] = ratio(row["images_per_s"], best and best["images_per_s"])
    targets = {}
    if out["served_c8_vs_engine_best"] is not None:
        targets["served c8 images/s >= 90% of engine best"] = (
            out["served_c8_vs_engine_best"] >= TARGET_THROUGHPUT_RATIO
        )
    if out["served_c1_p50_vs_engine_batch1_p50"] is not None:
        targets["served c1 p50 <= 1.15x engine batch-1 p50"] = (
            out["served_c1_p50_vs_engine_batch1_p50"] <= TARGET_LATENCY_RATIO
        )
    if served:
        targets["no served request failed"] = all(r["failures"] == 0 for r in served)
        targets["no response-cache hit in served phases"] = all(not r["cache_hits"] for r in served)
    out["targets"] = targets
    return out


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(result: dict) -> str:
    """The results as a markdown section (table, ratios, targets, how it was measured)."""
    env, summary = result["environment"], result["summary"]
    load_start = env["load_average_at_start"][0]
    load_end = env.get("load_average_at_end", [float("nan")])[0]
    busy = load_start > 0.5 * (env["cpus"] or 1)  # at the end it includes the bench's own load
    quiet_note = (
        ": **other processes were running, these numbers are not those of a quiet machine**" if busy else ""
    )
    lines = [
        f"Measured {env['date']} on {env['cpu']} ({env['cpus']} CPUs), torch {env['torch']} "
        f"({env['torch_threads']} threads in-process), checkpoint `{env['checkpoint']}`, "
        f"{env['images']} images from `{env['image_dir']}`, beam size {env['beam_size']}, max length "
        f"{env['max_length']}, commit `{env['commit']}`. Load average (1 min) {load_start:.1f} at the start and "
        f"{load_end:.1f} at the end{quiet_note}.",
        "",
        "| path | setting | images | images/s | p50 ms | p95 ms | p99 ms | x reference | vs engine best "
        "| ofa avg batch | ofa queue ms | ofa compute ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["phases"]:
        lines.append(
            f"| {r['path']} | {r['setting']} | {r['images']} | {_fmt(r['images_per_s'], 2)} | {_fmt(r['p50_ms'])} "
            f"| {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r.get('vs_reference'), 1)} "
            f"| {_fmt(r.get('vs_engine_best') and r['vs_engine_best'] * 100, 0)}% "
            f"| {_fmt(r.get('ofa_avg_batch'), 2)} | {_fmt(r.get('ofa_queue_ms'))} | {_fmt(r.get('ofa_compute_ms'))} |"
        )
    lines += [
        "",
        "Latency is per call: one image, except engine batch B (one call = B images). ofa columns: Triton's "
        "metrics over the phase (average executed batch = nv_inference_count / nv_inference_exec_count; queue "
        "and compute-infer time per request).",
        "",
    ]
    for key, value in summary.items():
        if key != "targets":
            lines.append(
                f"- {key.replace('_', ' ')}: {_fmt(value, 3) if isinstance(value, float) else value}"
            )
    lines.append("")
    for name, ok in summary["targets"].items():
        lines.append(f"- target: {name}: **{'met' if ok else 'MISSED'}**")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def _display_path(path: str | Path) -> str:
    """``path`` relative to the checkout when inside it, else absolute."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return str(resolved)


def environment_info(args: argparse.Namespace, model_dir: Path, n_images: int) -> dict:
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = "?"
    checkpoint = _display_path(model_dir)
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "checkpoint": checkpoint,
        "image_dir": _display_path(args.image_dir),
        "images": n_images,
        "beam_size": args.beam_size or "default",
        "max_length": args.max_length or "default",
        "commit": commit or "?",
        "load_average_at_start": os.getloadavg(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so a server this run started is stopped by its PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(args.model_dir).resolve()
    named = load_images(args.image_dir)
    images = [data for _name, data in named]
    result: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": environment_info(args, model_dir, len(images)),
        "phases": [],
    }
    _log(f"{len(images)} images from {args.image_dir}; checkpoint {model_dir}")
    if args.reference_images > 0:
        result["phases"] += bench_reference(model_dir, images, args)
    if not args.skip_engine:
        result["phases"] += bench_engine(model_dir, images, args)
    if not args.skip_served:
        corpus = UniqueImages(named, unique=True)
        if corpus.not_unique:
            _log(f"warning: sent unchanged (cache hits possible): {corpus.not_unique}")
        rows, info = bench_served(corpus, args)
        result["phases"] += rows
        result["server"] = info
    result["environment"]["load_average_at_end"] = os.getloadavg()
    result["summary"] = summarize(result["phases"])
    json_path = args.results_dir / f"{args.name}.json"
    md_path = args.results_dir / f"{args.name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    print("\n" + markdown(result))
    _log(f"wrote {json_path} and {md_path}")
    missed = [name for name, ok in result["summary"]["targets"].items() if not ok]
    if missed:
        _log("targets missed: " + "; ".join(missed))
        if args.check:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
