"""``python -m ofa_eval``: caption a COCO-format set with a served model or the engine, score it, compare runs.

    python -m ofa_eval run DATASET [--images DIR] [--split test] [--limit N]
                           [--url HOST:PORT | --url http://HOST:PORT] [--model caption] [--concurrency 8]
                           [--api-key KEY] [--tls [--ca-cert PEM] [--client-cert PEM --client-key PEM]]
                           [--engine CHECKPOINT [--device cpu] [--dtype bfloat16]]
                           [--output FILE] [--restart] [--baseline OTHER.json]
    python -m ofa_eval score DATASET --predictions CAPTIONS.json    # captions made elsewhere
    python -m ofa_eval compare A.json B.json

``run`` is the default command (``python -m ofa_eval DATASET ...``). Exit status: 0 scored, 1 an error (bad
dataset file, missing images, server unreachable or refusing an image, scoring failed), 2 bad arguments,
130 interrupted (the captions so far are kept; the same command resumes).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from .dataset import DatasetError, load_caption_set
from .java import JavaError
from .predict import EnginePredictor, PredictionError, ServedPredictor
from .report import compare_table, scores_table
from .results import (
    PartialResults,
    ResultsError,
    load_predictions,
    load_results,
    references_digest,
    write_results,
)
from .scoring import METRIC_GROUPS, ScoringError, score_captions

__all__ = ["main"]

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DEFAULT_RESULTS_DIR = Path("eval_results")
ERRORS = (DatasetError, PredictionError, ScoringError, ResultsError, JavaError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ofa_eval",
        description="COCO caption evaluation (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE) of a served model or the engine.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def dataset(p: argparse.ArgumentParser) -> None:
        p.add_argument("dataset", type=Path, help="Karpathy's dataset_coco.json or a COCO captions_*.json")
        p.add_argument("--images", type=Path, help="image folder (default: the dataset file's folder)")
        p.add_argument("--split", help="Karpathy split: train, restval, val, test (default test)")
        p.add_argument("--limit", type=int, help="only the first N images of the split")

    def scoring(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
        out = p.add_argument_group("scoring and output")
        out.add_argument(
            "--metrics",
            default=",".join(METRIC_GROUPS),
            help=f"comma-separated scorers among {','.join(METRIC_GROUPS)} (default all)",
        )
        out.add_argument(
            "--spice",
            choices=("auto", "on", "off"),
            default="auto",
            help="auto: SPICE when its models are present, else skipped with a message (default); on: require them",
        )
        out.add_argument(
            "--output",
            "-o",
            type=Path,
            help=f"results JSON (default {DEFAULT_RESULTS_DIR}/<set>-<source>.json)",
        )
        out.add_argument(
            "--baseline", type=Path, help="a results JSON of the same set to print the differences with"
        )
        return out

    run = sub.add_parser("run", help="caption a caption set and score it")
    dataset(run)
    src = run.add_argument_group("captions from a served model (the default) or the engine")
    src.add_argument(
        "--url",
        help="server host:port or URL; http(s):// means HTTP, else gRPC (default 127.0.0.1:8001, gRPC)",
    )
    src.add_argument("--protocol", choices=("grpc", "http"), help="override the URL's protocol")
    src.add_argument("--model", default="caption", help="served model name (default caption)")
    src.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    src.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    src.add_argument(
        "--api-key",
        help="inference key for a server with OFA_API_KEY (default: $CAPTION_API_KEY, else the file "
        "$CAPTION_API_KEY_FILE; prefer those: a command line is visible to other local users)",
    )
    src.add_argument("--tls", action="store_true", help="connect over TLS (gRPC TLS, or HTTPS)")
    src.add_argument("--ca-cert", metavar="PEM", help="CA certificate that signed the server's (with --tls)")
    src.add_argument("--client-cert", metavar="PEM", help="client certificate chain for mutual TLS")
    src.add_argument("--client-key", metavar="PEM", help="client private key for mutual TLS")
    src.add_argument(
        "--engine", type=Path, metavar="CHECKPOINT", help="caption in-process with this checkpoint"
    )
    src.add_argument("--device", help="engine device: cpu (default) or cuda")
    src.add_argument("--dtype", help="engine dtype: float32 (default), bfloat16, float16 (CUDA)")
    src.add_argument("--batch-size", type=int, default=8, help="engine images per batch (default 8)")
    src.add_argument("--beam-size", type=int, help="beam size (default: the checkpoint's)")
    src.add_argument("--max-length", type=int, help="max generated tokens (default: the checkpoint's)")
    out = scoring(run)
    out.add_argument("--restart", action="store_true", help="discard the captions of an interrupted run")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")

    score = sub.add_parser("score", help="score captions from a file (COCO results format or a results JSON)")
    dataset(score)
    score.add_argument(
        "--predictions",
        type=Path,
        required=True,
        help='captions: a COCO results file [{"image_id": ..., "caption": ...}, ...] or a results JSON of run',
    )
    scoring(score)

    compare = sub.add_parser("compare", help="per-metric differences of two results files of the same set")
    compare.add_argument("a", type=Path, help="results JSON A (e.g. float32 or the published model)")
    compare.add_argument("b", type=Path, help="results JSON B (e.g. bfloat16 or the fine-tuned model)")
    return parser


def _default_output(args: argparse.Namespace, source: dict[str, Any]) -> Path:
    parts = [args.dataset.stem, args.split or ""]
    if source["kind"] == "served":
        parts.append(source["model"])
    elif source["kind"] == "engine":
        parts += [Path(source["checkpoint"]).name, source["dtype"]]
    else:
        parts.append(Path(source["path"]).stem)
    if args.limit:
        parts.append(f"limit{args.limit}")
    name = "-".join(p for p in parts if p)
    return DEFAULT_RESULTS_DIR / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".json")


def _progress(total: int, initial: int, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="captioning", disable=disable, file=sys.stderr)


def _metrics(args: argparse.Namespace) -> list[str]:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(METRIC_GROUPS))
    if unknown or not metrics:
        raise ValueError(f"--metrics takes {','.join(METRIC_GROUPS)}, got {args.metrics!r}")
    return metrics


def _load_baseline(path: Path | None, caption_set) -> dict[str, Any] | None:
    """The ``--baseline`` results, checked before any captioning to be of the same images and references."""
    if path is None:
        return None
    baseline = load_results(path)
    if baseline["dataset"].get("references_sha256") != references_digest(caption_set.samples):
        raise ResultsError(
            f"--baseline {path} is not of the same caption set ({baseline['dataset'].get('images')} images of "
            f"{baseline['dataset'].get('path')}; this run: {len(caption_set.samples)} images of {caption_set.path})"
        )
    return baseline


def _finish(args, caption_set, source, captions, metrics, baseline) -> Path:
    """Score, write the results JSON, print the table (and the differences with the baseline)."""
    output = args.output or _default_output(args, source)
    print(f"scoring {len(captions)} captions with pycocoevalcap ...", file=sys.stderr)
    scores = score_captions(
        {i: captions[i]["caption"] for i in caption_set.references},
        caption_set.references,
        metrics=metrics,
        spice=args.spice,
    )
    results = write_results(output, caption_set, args.limit, source, captions, scores)
    print(scores_table(results))
    print(f"results: {output}")
    if baseline is not None:
        print()
        print(compare_table(baseline, results, names=("baseline", "this run")))
    return output


def _run(args: argparse.Namespace) -> int:
    metrics = _metrics(args)
    served_only = (
        args.url,
        args.protocol,
        args.api_key,
        args.tls,
        args.ca_cert,
        args.client_cert,
        args.client_key,
    )
    if args.engine and any(served_only):
        raise ValueError(
            "--engine captions in-process; drop --url/--protocol/--api-key/--tls and the certificates"
        )
    caption_set = load_caption_set(args.dataset, args.images, split=args.split, limit=args.limit)
    baseline = _load_baseline(args.baseline, caption_set)

    if args.engine:
        predictor: Any = EnginePredictor(
            args.engine,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            beam_size=args.beam_size,
            max_length=args.max_length,
        )
    else:
        predictor = ServedPredictor(
            args.url,
            args.protocol,
            model=args.model,
            concurrency=args.concurrency,
            beam_size=args.beam_size,
            max_length=args.max_length,
            timeout=args.timeout,
            api_key=args.api_key,
            tls=args.tls,
            ca_cert=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
        )
    source = predictor.describe()
    output = args.output or _default_output(args, source)
    run_id = {
        "dataset": str(caption_set.path.resolve()),
        "format": caption_set.format,
        "split": caption_set.split,
        "source": source,
    }
    partial = PartialResults(output.with_name(output.name + ".partial.jsonl"), run_id)
    if args.restart:
        partial.remove()
    wanted = {s.image_id for s in caption_set.samples}
    done = {k: v for k, v in partial.load().items() if k in wanted}
    todo = [s for s in caption_set.samples if s.image_id not in done]
    if done:
        print(
            f"resuming: {len(done)} of {len(caption_set.samples)} images already captioned ({partial.path})",
            file=sys.stderr,
        )

    try:
        if todo:
            predictor.check()
    except PredictionError:
        predictor.close()
        raise
    try:
        partial.open(done)
        with _progress(len(caption_set.samples), len(done), args.no_progress) as bar:
            for prediction in predictor.predict(todo):
                partial.append(prediction)
                done[prediction.sample.image_id] = {"caption": prediction.caption, "score": prediction.score}
                bar.update(1)
    except KeyboardInterrupt:
        partial.close()
        print(
            f"\ninterrupted: {len(done)} of {len(caption_set.samples)} images captioned, saved in {partial.path}; "
            "run the same command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except PredictionError:
        partial.close()
        if done:
            print(
                f"captions so far saved in {partial.path} ({len(done)} of {len(caption_set.samples)})",
                file=sys.stderr,
            )
        raise
    finally:
        predictor.close()
    partial.close()

    _finish(args, caption_set, source, done, metrics, baseline)
    partial.remove()
    return 0


def _score(args: argparse.Namespace) -> int:
    metrics = _metrics(args)
    caption_set = load_caption_set(
        args.dataset, args.images, split=args.split, limit=args.limit, check_images=False
    )
    baseline = _load_baseline(args.baseline, caption_set)
    captions = load_predictions(args.predictions, [s.image_id for s in caption_set.samples])
    source = {"kind": "file", "path": str(args.predictions)}
    _finish(args, caption_set, source, captions, metrics, baseline)
    return 0


def _compare(args: argparse.Namespace) -> int:
    a, b = load_results(args.a), load_results(args.b)
    print(f"A: {args.a}\nB: {args.b}")
    print(compare_table(a, b))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ofa_eval``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("run", "score", "compare", "-h", "--help"):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    if args.command in ("run", "score") and importlib.util.find_spec("pycocoevalcap") is None:
        # Say so before captioning anything: the metrics come last, after minutes of captioning.
        print(
            "error: scoring needs the package 'pycocoevalcap', which `make eval` installs (requirements/eval.txt)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    try:
        return {"run": _run, "score": _score, "compare": _compare}[args.command](args)
    except ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:  # settings out of range (beam size, concurrency, dtype)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
