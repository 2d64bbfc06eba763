"""Command line: ``python -m client caption PATH...`` and ``python -m client health``.

``caption`` takes files, directories (searched recursively for image extensions), ``-`` (the image on stdin)
and http(s) URLs (downloaded by the client: an argument that starts with ``scheme://`` is a URL, anything else
a path; URLs that lead to loopback, private or link-local hosts are refused without ``--allow-private-urls``).
It prints ``path<TAB>caption`` lines, or JSON lines with ``--json`` (``{"image", "caption", "score"}``, or
``{"image", "error", "error_type"}`` for a failure), in input order. With ``--num-captions N`` it prints N
``path<TAB>caption`` lines per image, best first, and the JSON line gains ``"captions": [{"caption", "score"},
...]`` (``caption``/``score`` stay the best). Every failure is also reported on stderr and makes the exit status
1. A progress bar goes to stderr when there are many images and stderr is a terminal.

Retries (``caption``): a transient failure (server unreachable, stopping or overloaded, the model being reloaded,
a backend process that died under the request) is retried with backoff up to ``--retries`` times within
``--deadline`` seconds per image (defaults: those of :class:`client.CaptionClient`); ``--retries 0`` turns
retrying off. Invalid images and refused keys are never retried. ``-v`` logs each retry on stderr.

Security options (both commands): ``--api-key`` (default ``$CAPTION_API_KEY``, or the file named by
``$CAPTION_API_KEY_FILE``; prefer those, as a command line is visible to other local users), ``--tls``,
``--ca-cert``, ``--client-cert``/``--client-key`` (mutual TLS).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from .api import (
    DEFAULT_DEADLINE,
    DEFAULT_RETRIES,
    DOWNLOAD_TIMEOUT,
    CaptionClient,
    CaptionError,
    ImageSourceError,
    is_url,
)

__all__ = ["IMAGE_EXTENSIONS", "expand_inputs", "main"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PROGRESS_MIN_IMAGES = 8


def expand_inputs(args: list[str]) -> Iterator[tuple[str, object]]:
    """``(name, source)`` per image: files, directories (recursive, sorted, by extension), ``-``, URLs
    (an argument that starts with ``scheme://``; any other argument is a path).

    A path that does not exist yields an :class:`ImageSourceError` as its source.
    """
    for arg in args:
        if arg == "-":
            yield "-", sys.stdin.buffer.read()
        elif is_url(arg):  # scheme://...: the client downloads http(s) and refuses other schemes
            yield arg, arg
        else:
            path = Path(arg)
            if path.is_dir():
                for p in sorted(path.rglob("*")):
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                        yield str(p), p
            elif path.exists():
                yield arg, path
            else:
                yield arg, ImageSourceError("no such file or directory")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client", description="Caption images with the OFA Triton server."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def connection(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            default=os.environ.get("CAPTION_URL"),
            help="server address host:port or URL (default: $CAPTION_URL, else 127.0.0.1:8001 for gRPC, :8000 for HTTP)",
        )
        p.add_argument(
            "--protocol", choices=["grpc", "http"], default=None, help="default: from --url, else grpc"
        )
        p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
        p.add_argument(
            "--model",
            default=None,
            help="public model to call (default: caption; a server with OFA_MODELS serves several)",
        )
        sec = p.add_argument_group("security")
        sec.add_argument(
            "--api-key",
            default=None,
            help="inference key for a server with OFA_API_KEY (default: $CAPTION_API_KEY, else the file "
            "$CAPTION_API_KEY_FILE; prefer those: a command line is visible to other local users)",
        )
        sec.add_argument(
            "--tls",
            action="store_true",
            help="connect over TLS (gRPC TLS; for HTTP the same as an https:// URL)",
        )
        sec.add_argument(
            "--ca-cert", metavar="PEM", help="CA certificate that signed the server's (with --tls)"
        )
        sec.add_argument("--client-cert", metavar="PEM", help="client certificate chain for mutual TLS")
        sec.add_argument("--client-key", metavar="PEM", help="client private key for mutual TLS")

    cap = sub.add_parser("caption", help="caption images (files, directories, - for stdin, http(s) URLs)")
    cap.add_argument("paths", nargs="+", metavar="PATH")
    connection(cap)
    cap.add_argument(
        "--beam-size", type=int, default=None, help="beam size 1..16 (default: the checkpoint's)"
    )
    cap.add_argument(
        "--max-length", type=int, default=None, help="max caption tokens 1..64 (default: the checkpoint's)"
    )
    cap.add_argument(
        "--num-captions",
        type=int,
        default=None,
        help="captions per image, best first, 1..beam size (default: one, the best)",
    )
    cap.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help=f"most retries of an image after a transient failure; 0 = none (default {DEFAULT_RETRIES})",
    )
    cap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help=f"seconds per image, all attempts and waits included (default: the longer of {DEFAULT_DEADLINE:g} "
        "and --timeout)",
    )
    cap.add_argument("-v", "--verbose", action="store_true", help="log each retry on stderr")
    cap.add_argument("--json", action="store_true", help="print JSON lines instead of path<TAB>caption")
    cap.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    cap.add_argument("--no-progress", action="store_true", help="no progress bar")
    cap.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let image URLs lead to loopback, private or link-local hosts (refused by default)",
    )
    cap.add_argument(
        "--download-timeout",
        type=float,
        default=DOWNLOAD_TIMEOUT,
        help=f"seconds for the whole download of one image URL (default {DOWNLOAD_TIMEOUT:g})",
    )

    health = sub.add_parser("health", help="print server and model readiness; exit 1 unless all are ready")
    connection(health)
    return parser


def _caption(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        print("error: --concurrency must be at least 1", file=sys.stderr)
        return 2
    items = list(expand_inputs(args.paths))
    if not items:
        print("error: no images found", file=sys.stderr)
        return 1
    bar = None
    if not args.no_progress and len(items) >= PROGRESS_MIN_IMAGES:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(items), file=sys.stderr, unit="img", disable=None)
        except ImportError:
            bar = None

    def emit(line: str) -> None:
        if bar is not None:
            bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    failures = 0
    sources = [src for _, src in items]
    with (
        _retry_messages(args.verbose),
        CaptionClient(
            args.url,
            args.protocol,
            timeout=args.timeout,
            retries=args.retries,
            deadline=args.deadline,
            allow_private_urls=args.allow_private_urls,
            download_timeout=args.download_timeout,
            **_connection(args),
        ) as client,
    ):
        results = client.imap(
            sources,
            concurrency=args.concurrency,
            beam_size=args.beam_size,
            max_length=args.max_length,
            num_captions=args.num_captions,
        )
        for (name, _), result in zip(items, results, strict=True):
            if isinstance(result, CaptionError):
                failures += 1
                print(f"error: {name}: {result}", file=sys.stderr, flush=True)
                if args.json:
                    emit(
                        json.dumps({"image": name, "error": str(result), "error_type": type(result).__name__})
                    )
            elif args.json:
                ranked = result if isinstance(result, list) else [result]
                line = {"image": name, "caption": ranked[0].text, "score": ranked[0].score}
                if isinstance(result, list):
                    line["captions"] = [{"caption": c.text, "score": c.score} for c in result]
                emit(json.dumps(line, ensure_ascii=False))
            else:
                for caption in result if isinstance(result, list) else [result]:
                    emit(f"{name}\t{' '.join(caption.text.split())}")
            if bar is not None:
                bar.update(1)
        retried = client.retry_count
    if bar is not None:
        bar.close()
    if failures:
        print(f"{failures} of {len(items)} image(s) failed", file=sys.stderr)
    if retried:
        print(f"{retried} retr{'y' if retried == 1 else 'ies'} after transient failures", file=sys.stderr)
    return 1 if failures else 0


@contextlib.contextmanager
def _retry_messages(verbose: bool) -> Iterator[None]:
    """While captioning: every retry on stderr with ``-v``, else a single notice at the first one."""
    logger = logging.getLogger("client")
    if verbose:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = _FirstRetryNotice()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _FirstRetryNotice(logging.Handler):
    """Says once on stderr that the client is retrying (a server that is down makes each image wait up to its
    deadline), and how to see each retry or turn retrying off."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.shown = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.shown or not hasattr(record, "retry_error"):
            return
        self.shown = True
        print(
            f"retrying after a transient failure ({record.retry_error}: {record.retry_message}); each image waits "
            "up to --deadline seconds: -v shows every retry, --retries 0 turns retrying off",
            file=sys.stderr,
            flush=True,
        )


def _connection(args: argparse.Namespace) -> dict[str, object]:
    """CaptionClient keywords from the options every command shares (the model, the key, TLS)."""
    options: dict[str, object] = {
        "api_key": args.api_key,
        "tls": args.tls,
        "ca_cert": args.ca_cert,
        "client_cert": args.client_cert,
        "client_key": args.client_key,
    }
    if args.model is not None:
        options["model"] = args.model
    return options


def _health(args: argparse.Namespace) -> int:
    with CaptionClient(
        args.url, args.protocol, timeout=args.timeout, retries=0, **_connection(args)
    ) as client:
        report = client.health() if args.model is None else client.health((args.model,))
    where = f"{client.protocol}{'s' if client.ssl else ''}://{client.address}"
    for key, ok in report.items():
        label = f"server {key}" if key in ("live", "ready") else key.replace("model:", "model ")
        print(f"{label:<18} {'yes' if ok else 'NO'}")
    all_ok = all(report.values())
    print(f"{where}: {'all ready' if all_ok else 'not ready'}", file=sys.stderr)
    return 0 if all_ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m client`` / ``ofa-caption``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _caption(args) if args.command == "caption" else _health(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ValueError as exc:  # bad --url / --protocol / TLS files / key settings (never the key itself)
        print(f"error: {exc}", file=sys.stderr)
        return 2
