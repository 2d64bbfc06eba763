"""Shared helpers of the load test, the benchmark and their tests (standard library + numpy; ``ofa_serving`` on first use).

Nothing here imports ``tritonclient``: the locustfile must patch gRPC for gevent *before* ``tritonclient.grpc``
is imported, and it imports this module.

* image corpus: :func:`find_images`, :func:`load_images`, and :class:`UniqueImages`, which makes every request's
  bytes distinct (a few trailing bytes after the encoded image) so that Triton's response cache on the
  ``caption`` ensemble cannot answer a load test or a benchmark from memory;
* latency statistics: :func:`latency_summary`; the user counts of a stepped load: :func:`parse_steps`;
* the server: :func:`server_ready`, :func:`ensure_server` (use the server answering on the ports, or start one
  with ``ofa_serving``'s launcher and stop it afterwards);
* Triton's Prometheus metrics (``prometheus_client``'s parser): :func:`scrape_metrics`, :func:`model_metrics_delta`;
* the command line the benchmark, the soak and the burst share: :func:`add_server_arguments`,
  :func:`assign_free_ports`, :func:`server_from_args`; :func:`run_tool`, every tool's entry point, which says in
  one line which make target installs a missing package.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import os
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ofa_serving import probe

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE_DIR = REPO_ROOT / "samples"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: The packages of the dev set (requirements/dev.txt, ``make setup-dev``) each kind of load tool imports.
REFERENCE_PACKAGES = ("modelscope", "fairseq", "transformers")
METRICS_PACKAGES = ("prometheus_client",)
PLOT_PACKAGES = ("matplotlib",)
# This project's own packages: a ModuleNotFoundError naming one of them is a bug, not a missing install.
_OWN_PACKAGES = {"ofa_captioning", "ofa_serving", "ofa_eval", "load_tests.testkit", "client", "load_tests"}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Appended after the encoded image. Every decoder the engine uses (Pillow's JPEG, PNG, WebP, BMP, GIF and TIFF
# readers) stops at the end of the image data and ignores trailing bytes; UniqueImages checks that per image.
_NONCE_MARKER = b"\x00ofa-load-test-nonce:"


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, by extension, sorted by path)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_images(folder: str | os.PathLike, limit: int | None = None) -> list[tuple[str, bytes]]:
    """``(name, encoded bytes)`` of the images under ``folder``; raises if there is none."""
    paths = find_images(folder)
    if not paths:
        raise FileNotFoundError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    if limit is not None:
        paths = paths[:limit]
    return [(str(p.relative_to(folder)), p.read_bytes()) for p in paths]


def decodes(data: bytes) -> bool:
    """Whether Pillow decodes ``data`` completely (the check behind :class:`UniqueImages`)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:
        return False


class UniqueImages:
    """Thread-safe round robin over an image corpus that returns distinct bytes on every call.

    With ``unique=True`` each image gets ``_NONCE_MARKER + <process id>-<counter>`` appended, so no two requests
    carry the same tensor and Triton's response cache (keyed by the input tensors) never hits. Images whose
    decoder would not accept the trailing bytes (checked once, with Pillow) are sent unchanged and named in
    :attr:`not_unique`. ``unique=False`` sends the corpus as is (repeats are then cache hits on the server).
    """

    def __init__(self, images: Sequence[tuple[str, bytes]], *, unique: bool = True, check: bool = True):
        if not images:
            raise ValueError("UniqueImages needs at least one image")
        self.images = list(images)
        self.unique = unique
        self.not_unique: list[str] = []
        self._suffixable = [True] * len(self.images)
        if unique and check:
            for index, (name, data) in enumerate(self.images):
                if not decodes(data + _NONCE_MARKER + b"0-0"):
                    self._suffixable[index] = False
                    self.not_unique.append(name)
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._tag = f"{os.getpid()}-{id(self):x}".encode()

    def __len__(self) -> int:
        return len(self.images)

    def next(self) -> tuple[str, bytes]:
        """The next ``(name, bytes)``; the bytes differ from every earlier call's when ``unique``."""
        with self._lock:
            n = next(self._counter)
        index = n % len(self.images)
        name, data = self.images[index]
        if self.unique and self._suffixable[index]:
            data = data + _NONCE_MARKER + self._tag + b"-" + str(n).encode()
        return name, data


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean and p50/p95/p99/max of latencies given in seconds, reported in milliseconds."""
    import numpy as np

    if len(latencies_s) == 0:
        return {"count": 0, "mean_ms": None, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "count": int(ms.size),
        "mean_ms": round(float(ms.mean()), 2),
        "p50_ms": round(float(p50), 2),
        "p95_ms": round(float(p95), 2),
        "p99_ms": round(float(p99), 2),
        "max_ms": round(float(ms.max()), 2),
    }


# ----------------------------------------------------------------------------------------------- server


def server_ready(host: str, http_port: int, timeout: float = 2.0) -> bool:
    """Whether a Triton server answers ``GET /v2/health/ready`` with 200 on ``host:http_port``."""
    return probe.server_ready(f"http://{host}:{http_port}", timeout)


@dataclass
class ServerHandle:
    """Where the server of a run answers, and whether this run started it."""

    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    started: bool
    model_dir: str | None = None
    log_file: str | None = None
    pid: int | None = None

    @property
    def grpc_address(self) -> str:
        """``host:port`` of the gRPC endpoint, as ``TritonServer.grpc_address``."""
        return f"{self.host}:{self.grpc_port}"


@contextlib.contextmanager
def ensure_server(
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    *,
    start: bool = True,
    model_dir: str | os.PathLike | None = None,
    log_file: str | os.PathLike | None = None,
    ready_timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    response_cache_bytes: int | None = None,
    model_repository: str | os.PathLike | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[ServerHandle]:
    """Yield a :class:`ServerHandle` for a ready server on the given ports.

    If a server already answers on ``host:http_port`` it is used as is (and left running). Otherwise, with
    ``start=True``, ``ofa_serving.launcher.TritonServer`` starts one with ``model_dir`` (default:
    ``OFA_MODEL_DIR``, else the demo checkpoint, built if missing), waits until it is ready (warm) and stops
    it by its PID when the block ends; ``env``, ``model_repository`` and ``extra_args`` (tritonserver flags) go
    to that server.
    """
    if server_ready(host, http_port):
        yield ServerHandle(host, http_port, grpc_port, metrics_port, started=False)
        return
    if not start:
        raise RuntimeError(
            f"no Triton server answers on http://{host}:{http_port} and starting one was not asked"
        )
    from load_tests.testkit.servers import running
    from ofa_serving.launcher import TritonServer

    model_dir = resolve_model_dir(model_dir)
    kwargs = {} if response_cache_bytes is None else {"response_cache_bytes": response_cache_bytes}
    server = TritonServer(
        model_repository=model_repository,
        model_dir=model_dir,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_file=log_file,
        env=env,
        extra_args=list(extra_args),
        **kwargs,
    )
    flags = f", flags {' '.join(extra_args)}" if extra_args else ""
    print(
        f"starting tritonserver (checkpoint {model_dir}{flags}, log {log_file or 'inherited'}) ...",
        flush=True,
    )
    with running(server, ready_timeout):
        yield ServerHandle(
            host,
            http_port,
            grpc_port,
            metrics_port,
            started=True,
            model_dir=str(model_dir),
            log_file=str(log_file) if log_file else None,
            pid=server.pid,
        )


def parse_steps(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; every count must be a positive integer."""
    steps = [int(part) for part in str(text).replace(" ", "").split(",") if part]
    if not steps or any(n < 1 for n in steps):
        raise ValueError(f"user steps must be positive integers separated by commas, got {text!r}")
    return steps


def add_server_arguments(parser: argparse.ArgumentParser, results_name: str) -> None:
    """The options every tool that starts (or uses) a server shares: images, checkpoint, where the server is
    (ports 0 = free ports, a server this run starts), its model repository, and where results go."""
    env = os.environ.get
    parser.add_argument("--image-dir", default=env("OFA_LOAD_IMAGES", str(DEFAULT_IMAGE_DIR)))
    parser.add_argument(
        "--model-dir", default=None, help="checkpoint (default: OFA_MODEL_DIR, else the demo one)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=0, help="use/start the server here (0 = free ports)")
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument(
        "--no-start", action="store_true", help="use the server on the given ports, never start one"
    )
    parser.add_argument(
        "--model-repository", default=None, help="for the started server (default: model_repository/)"
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the started server, e.g. OFA_TORCH_THREADS=1 (repeat)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra tritonserver flag for the started server, e.g. --server-arg=--backend-config=... (repeat)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default=results_name, help="output file stem under --results-dir")


def assign_free_ports(args: argparse.Namespace) -> None:
    """Unless all three ports were given, pick three free ones on ``args.host`` for a server this run starts."""
    if not (args.http_port and args.grpc_port and args.metrics_port):
        from ofa_serving.launcher import free_ports

        args.http_port, args.grpc_port, args.metrics_port = free_ports(3, args.host)


def server_from_args(args: argparse.Namespace, **kwargs) -> contextlib.AbstractContextManager[ServerHandle]:
    """:func:`ensure_server` with the options of :func:`add_server_arguments` (after :func:`assign_free_ports`);
    its log goes to ``<results-dir>/<name>_tritonserver.log``."""
    return ensure_server(
        args.host,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        start=not args.no_start,
        model_dir=args.model_dir,
        log_file=args.results_dir / f"{args.name}_tritonserver.log",
        model_repository=args.model_repository,
        env=dict(item.split("=", 1) for item in args.server_env),
        extra_args=args.server_arg,
        **kwargs,
    )


def resolve_model_dir(model_dir: str | os.PathLike | None = None) -> Path:
    """``model_dir``, else ``OFA_MODEL_DIR``, else the demo checkpoint (``DEMO_CHECKPOINT``, built if missing)."""
    if model_dir:
        return Path(model_dir)
    if os.environ.get("OFA_MODEL_DIR"):
        return Path(os.environ["OFA_MODEL_DIR"])
    from load_tests.testkit.servers import demo_checkpoint_dir
    from ofa_captioning.demo_checkpoint import ensure_demo_checkpoint

    return Path(ensure_demo_checkpoint(demo_checkpoint_dir()))


# ---------------------------------------------------------------------------------------------- metrics

MetricKey = tuple[str, frozenset[tuple[str, str]]]


def parse_metrics(text: str) -> dict[MetricKey, float]:
    """Prometheus text exposition -> ``{(name, frozenset(labels)): value}`` (``load_tests.testkit.servers``'s parser)."""
    from load_tests.testkit.servers import parse_metrics as parse

    return parse(text)


def scrape_metrics(host: str, metrics_port: int, timeout: float = 5.0) -> dict[MetricKey, float]:
    """Triton's metrics from ``http://host:metrics_port/metrics``."""
    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=timeout) as response:
        return parse_metrics(response.read().decode())


def settled_metrics(
    host: str,
    metrics_port: int,
    models: Sequence[str] = ("caption", "preprocess", "ofa"),
    interval: float = 0.1,
    timeout: float = 5.0,
) -> dict[MetricKey, float]:
    """A scrape taken once the request counters of ``models`` stopped moving (two equal scrapes in a row).

    Triton updates a request's statistics just after it sends the response, so a scrape right after the client
    got its last answer can miss that request, which would then count in the next phase.
    """
    import time

    def counts(metrics: Mapping[MetricKey, float]) -> list[float]:
        return [
            model_metric(metrics, name, model)
            for model in models
            for name in (
                "nv_inference_request_success",
                "nv_inference_request_failure",
                "nv_inference_exec_count",
            )
        ]

    previous = scrape_metrics(host, metrics_port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(interval)
        current = scrape_metrics(host, metrics_port)
        if counts(current) == counts(previous):
            return current
        previous = current
    return previous


def model_metric(metrics: Mapping[MetricKey, float], name: str, model: str) -> float:
    """Sum of metric ``name`` over the series labelled ``model=<model>`` (all versions); 0 if absent."""
    from load_tests.testkit.servers import metric_sum

    return metric_sum(metrics, name, model=model) or 0.0


MODEL_COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_cache_num_hits_per_model",
    "nv_cache_num_misses_per_model",
)


def model_metrics_delta(
    before: Mapping[MetricKey, float], after: Mapping[MetricKey, float], model: str
) -> dict[str, float | None]:
    """What ``model`` did between two scrapes: counter deltas and the derived per-request figures.

    ``avg_batch`` is ``nv_inference_count / nv_inference_exec_count`` (images per execution: how well dynamic
    batching merged requests); ``queue_ms`` and ``compute_ms`` are the queue and compute-infer durations per
    request (Triton adds an execution's compute time to each request of its batch).
    """
    delta = {
        name: model_metric(after, name, model) - model_metric(before, name, model) for name in MODEL_COUNTERS
    }
    requests = delta["nv_inference_request_success"]
    execs = delta["nv_inference_exec_count"]
    out: dict[str, float | None] = {k: round(v, 3) for k, v in delta.items()}
    out["avg_batch"] = round(delta["nv_inference_count"] / execs, 2) if execs else None
    out["queue_ms"] = (
        round(delta["nv_inference_queue_duration_us"] / requests / 1000.0, 2) if requests else None
    )
    out["compute_ms"] = (
        round(delta["nv_inference_compute_infer_duration_us"] / requests / 1000.0, 2) if requests else None
    )
    out["request_ms"] = (
        round(delta["nv_inference_request_duration_us"] / requests / 1000.0, 2) if requests else None
    )
    return out


def _missing_package_line(tool: str, package: str) -> str:
    return f"{tool}: needs the package {package!r}, which `make setup-dev` installs (requirements/dev.txt)"


def run_tool(main: Callable[[], int], *needs: str) -> int:
    """A load tool's ``__main__`` entry point: ``main()``'s exit status, or 2 with one line on stderr naming the
    make target that installs a missing package (the ``needs`` are checked before anything runs; a package
    imported later and missing is reported the same way)."""
    tool = Path(sys.argv[0]).name or "load tool"
    for package in needs:
        if importlib.util.find_spec(package) is None:
            print(_missing_package_line(tool, package), file=sys.stderr)
            return 2
    try:
        return main()
    except ModuleNotFoundError as exc:
        package = (exc.name or "").split(".")[0]
        if not package or package in _OWN_PACKAGES:
            raise
        print(_missing_package_line(tool, package), file=sys.stderr)
        return 2
