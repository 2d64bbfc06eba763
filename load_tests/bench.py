#!/usr/bin/env python
"""``make bench``: ModelScope's reference vs the engine in-process vs the served ``caption`` ensemble; exits 1
when a target is missed.

One run, one machine, the same images and the same generation settings for every path:

(a) ``reference``: ModelScope's OFA in-process (``load_tests.testkit.reference``), sequential, one image per call, on
    a few images only (it is slow);
(b) ``engine``: ``ofa_captioning.Captioner`` in-process on encoded bytes, at batch 1 and at batches 4, 8 and 16;
    the best batch is the engine's best throughput. (a) and (b) are timed by ``bench_engine.timed_calls``, the
    engine-vs-reference measurement ``make bench-engine`` runs too, here one side at a time;
(c) ``served``, closed loop: the ``caption`` ensemble over gRPC at concurrency 1, 4, 8 and 16 (N threads, one
    request in flight each) on a server this script starts with ``ofa_serving``'s launcher (or the one given with
    ``--grpc-port``/``--http-port``/``--metrics-port`` and ``--no-start``) once (a) and (b) are done, so that
    they run beside no server;
(d) ``served``, open loop: requests at constant arrival rates (fractions of the engine's best by default), the
    p50/p99-against-rate curve, the highest rate held with p99 under a bound derived from the engine's latency,
    and its plot (``bench_served.py``, ``openloop.py``).

Targets (``bench_report.py``): served closed-loop throughput at concurrency 8 >= 90 % of the engine's best;
served p50 at concurrency 1 <= 1.15x the engine's batch-1 latency; the highest open-loop rate held >= 90 % of the
engine's best; no failed request; no response-cache hit. A missed target prints a red ``[FAIL]`` line and exits 1
(``--report-only``: exit 0); a run whose skipped paths leave no target to check exits 1 too. ``--device cuda``
runs the engine and the server on CUDA and refuses at once, exit 2, where torch sees no CUDA device (``make
bench-gpu`` is ``bench_gpu.py``: the GPU profile, decoded pixels, up to batch 64).

Writes ``load_tests/results/bench.json``, ``bench.md`` and ``bench_open_loop.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from load_tests import loadlib, tool
from load_tests.bench_engine import Timing, timed_calls
from load_tests.bench_report import environment_info, ints, log, markdown, phase_result, summarize
from load_tests.bench_served import OPEN_LOOP_BOUND_FACTOR, bench_served
from load_tests.corpus import UniqueImages, load_images
from load_tests.loadlib import add_server_arguments, resolve_model_dir


def _add_inprocess_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--beam-size", type=int, default=None, help="for every path (default: the checkpoint's)")
    p.add_argument("--max-length", type=int, default=None, help="for every path (default: the checkpoint's)")
    p.add_argument("--reference-images", type=int, default=6, help="images for the reference (0 = skip it)")
    p.add_argument("--engine-images", type=int, default=24, help="calls of the engine at batch 1")
    p.add_argument("--batches", default="4,8,16", help="engine batch sizes besides 1")
    p.add_argument("--batch-images", type=int, default=48, help="images per engine batch size (rounded up)")
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
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="report missed targets but exit 0 (default: exit 1 when a target is missed)",
    )


def _add_served_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", default="1,4,8,16", help="served concurrency levels")
    p.add_argument("--served-requests", type=int, default=160, help="max requests per served phase")
    p.add_argument(
        "--min-served-requests", type=int, default=24, help="requests per phase even past the time"
    )
    p.add_argument("--phase-seconds", type=float, default=30.0, help="time bound of each phase")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each phase (x concurrency)")
    p.add_argument("--skip-served", action="store_true", help="no served phase (closed nor open loop)")
    p.add_argument("--skip-closed-loop", action="store_true", help="served: the open loop only")
    p.add_argument("--skip-open-loop", action="store_true", help="served: the closed loop only")
    p.add_argument(
        "--open-loop-rates",
        default=None,
        help="offered rates in requests/s, e.g. 0.5,1,2 (default: fractions)",
    )
    p.add_argument(
        "--open-loop-fractions",
        default="0.25,0.5,0.75,0.9,1.0",
        help="without --open-loop-rates: rates as fractions of the engine's best images/s in this run",
    )
    p.add_argument("--open-loop-seconds", type=float, default=30.0, help="time each rate is offered")
    p.add_argument(
        "--open-loop-p99-ms", type=float, default=None, help="p99 bound (default: derived from the engine)"
    )
    p.add_argument(
        "--open-loop-factor",
        type=float,
        default=OPEN_LOOP_BOUND_FACTOR,
        help="default bound = this x the engine's p50 per call at its best batch (2)",
    )
    p.add_argument(
        "--open-loop-max-in-flight", type=int, default=256, help="requests outstanding before one is not sent"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``make bench``: the server's (``loadlib.add_server_arguments``), the in-process phases',
    the served phases'."""
    add_server_arguments(p, "bench")
    _add_inprocess_arguments(p)
    _add_served_arguments(p)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``make bench``'s arguments (argparse exits 2 on bad ones)."""
    return tool.parse_args(TOOL, argv)


def check_arguments(args: argparse.Namespace) -> str | None:
    """The reason to refuse arguments that contradict each other, or ``None``: the open loop's default rates
    and bound come from the engine phase."""
    open_loop = not (args.skip_served or args.skip_open_loop)
    if open_loop and args.skip_engine and not (args.open_loop_rates and args.open_loop_p99_ms):
        return "--skip-engine with the open loop needs --open-loop-rates and --open-loop-p99-ms"
    return None


def check_device(args: argparse.Namespace) -> str | None:
    """Resolve ``--device``/``--dtype`` as the server does; the reason to refuse the run, or ``None``.

    ``--device cuda`` where torch sees no CUDA device is refused before anything is loaded or started. On CUDA the
    server this run starts gets ``OFA_DEVICE``/``OFA_DTYPE`` too (unless ``--server-env`` sets them), so the engine
    and the served model run on the same device and dtype.
    """
    import torch

    from ofa_serving.settings import SettingsError, resolve_device, resolve_dtype

    try:
        args.engine_device = resolve_device(args.device, torch.cuda.is_available())
    except SettingsError:
        return (
            f"--device cuda: torch {torch.__version__} sees no CUDA device (CUDA build: "
            f"{torch.version.cuda or 'none'}); the GPU benchmark needs a machine with an NVIDIA GPU and a CUDA "
            "build of torch. Nothing was run."
        )
    args.engine_dtype = resolve_dtype(args.dtype, args.engine_device)
    if args.engine_device == "cuda":
        given = {item.split("=", 1)[0] for item in args.server_env}
        for key, value in (("OFA_DEVICE", "cuda"), ("OFA_DTYPE", args.engine_dtype)):
            if key not in given:
                args.server_env.append(f"{key}={value}")
    return None


def _phase_row(path: str, setting: str, timing: Timing, **extra) -> dict:
    """A phase's row from a one-side :func:`timed_calls` run (its wall time includes the loop)."""
    (calls,) = timing.sides.values()
    return phase_result(path, setting, calls.latencies, calls.images, timing.wall_s, **extra)


def reference_phase(model_dir: Path, images: list[bytes], args: argparse.Namespace) -> list[dict]:
    """(a) ModelScope's OFA in-process, sequential, one image per call."""
    from load_tests.testkit.reference import Reference

    log("reference: loading ModelScope's OFA")
    with tool.Stopwatch() as loading:
        ref = Reference(model_dir)
    log(f"reference: loaded in {loading.seconds:.1f} s; warm-up")
    settings = {"beam_size": args.beam_size, "max_length": args.max_length}
    ref.caption_images(images[:1], **settings)
    n = min(args.reference_images, len(images))
    chunks = [[images[i % len(images)]] for i in range(n)]
    timing = timed_calls(
        {"reference": lambda chunk: ref.caption_images(chunk, **settings)},
        chunks,
        seconds=args.phase_seconds * 2,
    )
    row = _phase_row("reference", "ModelScope in-process, batch 1", timing)
    log(f"reference: {row['images_per_s']} images/s, p50 {row['p50_ms']} ms")
    return [row]


def engine_phases(model_dir: Path, images: list[bytes], args: argparse.Namespace) -> list[dict]:
    """(b) The engine in-process on encoded bytes, batch 1 then each of ``--batches`` (a warm-up call at each)."""
    import torch

    from ofa_captioning.captioner import Captioner
    from ofa_serving.settings import resolve_device, resolve_dtype

    device = resolve_device(args.device, torch.cuda.is_available())
    dtype = resolve_dtype(args.dtype, device)
    log(f"engine: loading on {device} ({dtype})")
    captioner = Captioner.from_pretrained(model_dir, device=device, dtype=dtype)
    settings = {"beam_size": args.beam_size, "max_length": args.max_length}
    engine = {"engine": lambda chunk: captioner.caption(chunk, **settings)}
    captioner.caption(images[:1], **settings)  # warm-up
    chunks = [[images[i % len(images)]] for i in range(args.engine_images)]
    rows = [
        _phase_row(
            "engine", "in-process, batch 1", timed_calls(engine, chunks, seconds=args.phase_seconds), batch=1
        )
    ]
    log(f"engine batch 1: {rows[-1]['images_per_s']} images/s, p50 {rows[-1]['p50_ms']} ms")
    for batch in ints(args.batches):
        calls = max(2, -(-args.batch_images // batch))
        chunks = [[images[(i * batch + k) % len(images)] for k in range(batch)] for i in range(calls)]
        captioner.caption(chunks[0], **settings)  # warm-up at this shape
        timing = timed_calls(engine, chunks, seconds=args.phase_seconds, min_calls=2)
        rows.append(_phase_row("engine", f"in-process, batch {batch}", timing, batch=batch))
        log(f"engine batch {batch}: {rows[-1]['images_per_s']} images/s, p50 {rows[-1]['p50_ms']} ms/batch")
    return rows


def _served(named: list[tuple[str, bytes]], args: argparse.Namespace, report: dict) -> dict | None:
    """(c) and (d): their rows join ``report["phases"]``; returns the open loop (``None`` when skipped)."""
    corpus = UniqueImages(named, unique=True)
    if corpus.not_unique:
        log(f"warning: sent unchanged (cache hits possible): {corpus.not_unique}")
    rows, info, open_loop = bench_served(corpus, args, report["phases"])
    report["phases"] += rows
    report["server"] = info
    report["open_loop"] = open_loop
    return open_loop


def run(args: argparse.Namespace, server: loadlib.ServerHandle | None = None) -> dict:
    """The phases (a) to (d) as the arguments ask, the ratios and the targets (the report's checks)."""
    refusal = check_arguments(args) or check_device(args)
    if refusal:
        raise tool.Refused(refusal)
    model_dir = resolve_model_dir(args.model_dir).resolve()
    named = load_images(args.image_dir)
    images = [data for _name, data in named]
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": environment_info(args, model_dir, len(images)),
        "phases": [],
    }
    log(f"{len(images)} images from {args.image_dir}; checkpoint {model_dir}; engine on {args.engine_device}")
    if args.reference_images > 0:
        report["phases"] += reference_phase(model_dir, images, args)
    if not args.skip_engine:
        report["phases"] += engine_phases(model_dir, images, args)
    open_loop = None if args.skip_served else _served(named, args, report)
    report["environment"]["load_average_at_end"] = os.getloadavg()
    report["summary"] = summarize(report["phases"], open_loop)
    report["checks"] = report["summary"]["targets"]
    return report


def print_report(report: dict) -> None:
    """The markdown report on stdout."""
    print("\n" + markdown(report))


TOOL = tool.Tool(
    name="bench",
    description=__doc__.split("\n\n")[0],
    add_arguments=add_arguments,
    run=run,
    summarize=print_report,
    needs_server=False,  # the served phases start the server after the in-process ones
    needs=(*loadlib.REFERENCE_PACKAGES, *loadlib.METRICS_PACKAGES, *loadlib.PLOT_PACKAGES),
    markdown=markdown,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``make bench``; the exit status of :func:`load_tests.tool.main`."""
    return tool.main(TOOL, None if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
