"""Engine vs ModelScope reference, in one process, same images and settings: throughput, latency, parity.

    python load_tests/bench_engine.py [--images 8] [--batch-sizes 1 8] [--json results.json]

Both sides start from the same float32 pixel batch (the reference's own preprocessing), so the figures are
model + beam search + text decoding + postprocessing. Calls alternate between the reference and the engine
(image by image at batch 1, batch by batch at batch 8), so that load from other processes hits both alike; the
load average is printed because this machine is shared. On a CUDA host the engine is also timed on the GPU
(``--gpu-dtype``). Captions must be identical and scores within 1e-4 for the CPU engine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.reference and tests.images

TARGETS = {1: 4.0, 8: 6.0}  # engine images/s over reference images/s (issue 2)
SCORE_ATOL = 1e-4


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint dir (default: the demo checkpoint)"
    )
    p.add_argument("--images", type=int, default=8, help="number of corpus images (default 8)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--gpu-dtype", default="float16", help="engine dtype on CUDA, if CUDA is available")
    p.add_argument(
        "--json", type=Path, default=None, help="also write the results as JSON here ('-' = stdout)"
    )
    p.add_argument("--check", action="store_true", help="exit 1 unless the targets hold and captions match")
    return p.parse_args(argv)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ofa_captioning.captioner import Captioner
    from ofa_captioning.demo_checkpoint import ensure_demo_checkpoint
    from tests.images import image_corpus
    from tests.reference import Reference

    checkpoint = args.checkpoint or ensure_demo_checkpoint(
        REPO_ROOT / os.environ.get("DEMO_CHECKPOINT", "checkpoints/ofa-tiny-demo")
    )
    corpus = image_corpus()
    if args.images > len(corpus):
        raise SystemExit(f"--images: the corpus has {len(corpus)} images")
    names = [n for n, _ in corpus[: args.images]]
    reference = Reference(checkpoint)
    engine = Captioner.from_pretrained(checkpoint)
    pixels = reference.pixels([data for _, data in corpus[: args.images]])
    load_before = os.getloadavg()

    # Warm-up (allocations, caches, lazy imports) on both sides, untimed.
    reference.caption(pixels[:1])
    engine.generate(pixels[:1])

    rows = []
    for bs in args.batch_sizes:
        chunks = [slice(i, min(i + bs, args.images)) for i in range(0, args.images, bs)]
        ref_time = eng_time = 0.0
        ref_out: list = []
        eng_out: list = []
        for chunk in chunks:
            r, dt = _timed(lambda chunk=chunk: reference.caption(pixels[chunk]))
            ref_time += dt
            ref_out += r
            e, dt = _timed(lambda chunk=chunk: engine.generate(pixels[chunk]))
            eng_time += dt
            eng_out += e
        same_text = sum(r[0] == e.text for r, e in zip(ref_out, eng_out, strict=True))
        max_diff = max(abs(r[1] - e.score) for r, e in zip(ref_out, eng_out, strict=True))
        rows.append(
            {
                "batch_size": bs,
                "calls": len(chunks),
                "reference_s": ref_time,
                "engine_s": eng_time,
                "reference_images_per_s": args.images / ref_time,
                "engine_images_per_s": args.images / eng_time,
                "reference_latency_s": ref_time / len(chunks),
                "engine_latency_s": eng_time / len(chunks),
                "reference_s_per_image": ref_time / args.images,
                "engine_s_per_image": eng_time / args.images,
                "speedup": ref_time / eng_time,
                "identical_captions": same_text,
                "max_score_diff": max_diff,
                "parity": same_text == args.images and max_diff <= SCORE_ATOL,
            }
        )

    steps = [max(len(h.tokens) for h in hyps) for hyps in engine.generate_hypotheses(pixels)]
    gpu = []
    if torch.cuda.is_available():
        gpu_engine = Captioner.from_pretrained(checkpoint, device="cuda", dtype=args.gpu_dtype)
        gpu_engine.warmup(batch_sizes=sorted(set(args.batch_sizes)))
        cpu_texts = [e.text for e in engine.generate(pixels)]
        for bs in args.batch_sizes:
            outs, total = [], 0.0
            for i in range(0, args.images, bs):
                torch.cuda.synchronize()
                out, dt = _timed(lambda i=i, bs=bs: gpu_engine.generate(pixels[i : i + bs]))
                total += dt
                outs += out
            gpu.append(
                {
                    "batch_size": bs,
                    "dtype": str(gpu_engine.dtype).removeprefix("torch."),
                    "images_per_s": args.images / total,
                    "s_per_image": total / args.images,
                    "captions_equal_to_cpu_fp32": sum(
                        a.text == b for a, b in zip(outs, cpu_texts, strict=True)
                    ),
                }
            )

    per_image = {r["batch_size"]: r["engine_s_per_image"] for r in rows}
    checks = {f"engine >= {t}x reference at batch {bs}": None for bs, t in TARGETS.items()}
    for r in rows:
        if r["batch_size"] in TARGETS:
            checks[f"engine >= {TARGETS[r['batch_size']]}x reference at batch {r['batch_size']}"] = (
                r["speedup"] >= TARGETS[r["batch_size"]]
            )
    if 1 in per_image and 8 in per_image:
        checks["engine batch 8 cheaper per image than batch 1"] = per_image[8] < per_image[1]
    checks["captions identical, scores within 1e-4"] = all(r["parity"] for r in rows)
    return {
        "checkpoint": str(checkpoint),
        "images": names,
        "decoder_steps_per_image": steps,
        "settings": {"beam_size": engine.default_beam_size, "max_length": engine.default_max_length},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": rows,
        "gpu": gpu,
        "checks": checks,
    }


def markdown(res: dict) -> str:
    lines = [
        f"Engine vs ModelScope reference: {len(res['images'])} images, beam {res['settings']['beam_size']}, "
        f"max length {res['settings']['max_length']}, torch {res['torch']}, {res['threads']} threads on "
        f"{res['cpus']} CPUs; load average {res['load_average_before'][0]:.2f} before, "
        f"{res['load_average_after'][0]:.2f} after. Decoder steps per image: {res['decoder_steps_per_image']}.",
        "",
        "| batch | reference img/s | engine img/s | speed-up | reference s/call | engine s/call "
        "| reference s/img | engine s/img | identical captions | max score diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['batch_size']} | {r['reference_images_per_s']:.3f} | {r['engine_images_per_s']:.3f} "
            f"| **{r['speedup']:.2f}x** | {r['reference_latency_s']:.3f} | {r['engine_latency_s']:.3f} "
            f"| {r['reference_s_per_image']:.3f} | {r['engine_s_per_image']:.3f} "
            f"| {r['identical_captions']}/{len(res['images'])} | {r['max_score_diff']:.1e} |"
        )
    if res["gpu"]:
        lines += [
            "",
            "| batch (GPU) | dtype | engine img/s | engine s/img | captions = CPU fp32 |",
            "|---:|---|---:|---:|---:|",
        ]
        for g in res["gpu"]:
            lines.append(
                f"| {g['batch_size']} | {g['dtype']} | {g['images_per_s']:.2f} | {g['s_per_image']:.4f} "
                f"| {g['captions_equal_to_cpu_fp32']}/{len(res['images'])} |"
            )
    lines.append("")
    for name, ok in res["checks"].items():
        lines.append(f"- {'PASS' if ok else ('n/a' if ok is None else 'FAIL')}: {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the markdown table."""
    args = _parse_args(argv)
    res = run(args)
    print(markdown(res))
    if args.json is not None:
        text = json.dumps(
            res, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else o
        )
        if str(args.json) == "-":
            print(text)
        else:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n", encoding="utf-8")
    if args.check and not all(ok for ok in res["checks"].values() if ok is not None):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
