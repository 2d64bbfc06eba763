#!/usr/bin/env python
"""``make bench``: ModelScope's reference vs the engine in-process vs the served ``caption`` ensemble; exits 1
when a target is missed.

One run, one machine, the same images and the same generation settings for every path:

(a) ``reference``: ModelScope's OFA in-process (``load_tests.testkit.reference``), sequential, one image per call, on a
    few images only (it is slow);
(b) ``engine``: ``ofa_captioning.Captioner`` in-process on encoded bytes, at batch 1 and at batches 4, 8 and 16;
    the best batch is the engine's best throughput (``bench_inprocess.py``);
(c) ``served``, closed loop: the ``caption`` ensemble over gRPC at concurrency 1, 4, 8 and 16 (N threads, one
    request in flight each) on a server this script starts with ``ofa_serving``'s launcher (or the one given with
    ``--grpc-port``/``--http-port``/``--metrics-port`` and ``--no-start``);
(d) ``served``, open loop: requests at constant arrival rates (fractions of the engine's best by default), the
    p50/p99-against-rate curve, the highest rate held with p99 under a bound derived from the engine's latency,
    and its plot (``bench_served.py``, ``openloop.py``).

Targets (``bench_report.py``): served closed-loop throughput at concurrency 8 >= 90 % of the engine's best;
served p50 at concurrency 1 <= 1.15x the engine's batch-1 latency; the highest open-loop rate held >= 90 % of the
engine's best; no failed request; no response-cache hit. A missed target prints a red ``FAIL`` line and exits 1
(``--report-only``: exit 0). ``--device cuda`` (``make bench-gpu``) runs the engine and the server on CUDA and
refuses at once, exit 2, where torch sees no CUDA device.

Writes ``load_tests/results/bench.json``, ``bench.md`` and ``bench_open_loop.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from load_tests.bench_inprocess import bench_engine, bench_reference
from load_tests.bench_report import environment_info, log, markdown, print_red, print_verdict, summarize
from load_tests.bench_served import OPEN_LOOP_BOUND_FACTOR, bench_served
from load_tests.loadlib import UniqueImages, add_server_arguments, load_images, resolve_model_dir

EXIT_MISSED = 1
EXIT_NO_DEVICE = 2


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
    p.add_argument("--skip-served", action="store_true", help="no served phase (closed nor open loop)")
    p.add_argument("--skip-engine", action="store_true")
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
    p.add_argument(
        "--report-only",
        action="store_true",
        help="report missed targets but exit 0 (default: exit 1 when a target is missed)",
    )
    args = p.parse_args(argv)
    open_loop = not (args.skip_served or args.skip_open_loop)
    # Checked before anything starts: the open loop's default rates and bound come from the engine phase.
    if open_loop and args.skip_engine and not (args.open_loop_rates and args.open_loop_p99_ms):
        p.error("--skip-engine with the open loop needs --open-loop-rates and --open-loop-p99-ms")
    return args


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    refusal = check_device(args)
    if refusal:
        print_red(f"FAIL: {refusal}")
        return EXIT_NO_DEVICE
    # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so a server this run started is stopped by its PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(args.model_dir).resolve()
    named = load_images(args.image_dir)
    images = [data for _name, data in named]
    result: dict = {
        "command": " ".join(
            [Path(sys.executable).name, *(sys.argv if argv is None else ["bench.py", *argv])]
        ),
        "environment": environment_info(args, model_dir, len(images)),
        "phases": [],
    }
    log(f"{len(images)} images from {args.image_dir}; checkpoint {model_dir}; engine on {args.engine_device}")
    if args.reference_images > 0:
        result["phases"] += bench_reference(model_dir, images, args)
    if not args.skip_engine:
        result["phases"] += bench_engine(model_dir, images, args)
    open_loop = None
    if not args.skip_served:
        corpus = UniqueImages(named, unique=True)
        if corpus.not_unique:
            log(f"warning: sent unchanged (cache hits possible): {corpus.not_unique}")
        rows, info, open_loop = bench_served(corpus, args, result["phases"])
        result["phases"] += rows
        result["server"] = info
        result["open_loop"] = open_loop
    result["environment"]["load_average_at_end"] = os.getloadavg()
    result["summary"] = summarize(result["phases"], open_loop)
    json_path = args.results_dir / f"{args.name}.json"
    md_path = args.results_dir / f"{args.name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    print("\n" + markdown(result))
    log(f"wrote {json_path} and {md_path}")
    missed = print_verdict(result["summary"])
    return EXIT_MISSED if missed and not args.report_only else 0


if __name__ == "__main__":
    from load_tests import loadlib

    sys.exit(
        loadlib.run_tool(main, *loadlib.REFERENCE_PACKAGES, *loadlib.METRICS_PACKAGES, *loadlib.PLOT_PACKAGES)
    )
