"""The in-process phases of ``make bench``: ModelScope's reference and the engine, on the same encoded images.

(a) ``reference``: ModelScope's OFA (``load_tests.testkit.reference``), sequential, one image per call;
(b) ``engine``: ``ofa_captioning.Captioner`` on encoded bytes (decode + preprocess + generate), at batch 1 and at
    each of ``--batches``; the best batch is the engine's best throughput, the yardstick of the served phases.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from load_tests.bench_report import ints, log, phase_result


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


def bench_reference(model_dir: Path, images: list[bytes], args: argparse.Namespace) -> list[dict]:
    """(a) ModelScope's OFA in-process, sequential, one image per call."""
    from load_tests.testkit.reference import Reference

    log("reference: loading ModelScope's OFA")
    t0 = time.perf_counter()
    ref = Reference(model_dir)
    log(f"reference: loaded in {time.perf_counter() - t0:.1f} s; warm-up")
    ref.caption_images(images[:1], beam_size=args.beam_size, max_length=args.max_length)
    n = min(args.reference_images, len(images))

    def call(i: int) -> int:
        ref.caption_images([images[i % len(images)]], beam_size=args.beam_size, max_length=args.max_length)
        return 1

    lat, done, wall = timed_calls(call, n, args.phase_seconds * 2)
    row = phase_result("reference", "ModelScope in-process, batch 1", lat, done, wall)
    log(f"reference: {row['images_per_s']} images/s, p50 {row['p50_ms']} ms")
    return [row]


def bench_engine(model_dir: Path, images: list[bytes], args: argparse.Namespace) -> list[dict]:
    """(b) The engine in-process on encoded bytes, batch 1 then each of ``--batches``."""
    import torch

    from ofa_captioning.captioner import Captioner
    from ofa_serving.settings import resolve_device, resolve_dtype

    device = resolve_device(args.device, torch.cuda.is_available())
    dtype = resolve_dtype(args.dtype, device)
    log(f"engine: loading on {device} ({dtype})")
    captioner = Captioner.from_pretrained(model_dir, device=device, dtype=dtype)
    kwargs = {"beam_size": args.beam_size, "max_length": args.max_length}
    rows = []
    captioner.caption(images[:1], **kwargs)  # warm-up

    def one(i: int) -> int:
        captioner.caption([images[i % len(images)]], **kwargs)
        return 1

    lat, done, wall = timed_calls(one, args.engine_images, args.phase_seconds)
    rows.append(phase_result("engine", "in-process, batch 1", lat, done, wall, batch=1))
    log(f"engine batch 1: {rows[-1]['images_per_s']} images/s, p50 {rows[-1]['p50_ms']} ms")
    for batch in ints(args.batches):
        calls = max(2, -(-args.batch_images // batch))

        def many(i: int, batch: int = batch) -> int:
            chunk = [images[(i * batch + k) % len(images)] for k in range(batch)]
            return len(captioner.caption(chunk, **kwargs))

        many(0)  # warm-up at this shape
        lat, done, wall = timed_calls(many, calls, args.phase_seconds, min_calls=2)
        rows.append(phase_result("engine", f"in-process, batch {batch}", lat, done, wall, batch=batch))
        log(f"engine batch {batch}: {rows[-1]['images_per_s']} images/s, p50 {rows[-1]['p50_ms']} ms/batch")
    return rows
