"""Shared helpers of the load test, the benchmark, the soak, the burst and their tests (standard library, numpy,
``ofa_serving``).

Nothing here imports ``tritonclient``: the locustfile must patch gRPC for gevent *before* ``tritonclient.grpc``
is imported, and it imports this module.

* image corpus: :func:`find_images`, :func:`load_images`, and :class:`UniqueImages`, which makes every request's
  bytes distinct (a few trailing bytes after the encoded image) so that Triton's response cache on the
  ``caption`` ensemble cannot answer a load test or a benchmark from memory;
* latency statistics: :func:`latency_summary`; the user counts of a stepped load: :func:`parse_steps`;
* the server of a tool run: :class:`ServerHandle` (where it answers, whether the run started it) and
  :func:`server_from_args` (use the server answering on the ports, or start one with ``ofa_serving``'s launcher
  through :func:`load_tests.testkit.servers.running` and stop it afterwards);
* Triton's Prometheus metrics (parsed by :func:`load_tests.testkit.servers.parse_metrics`): :func:`scrape_metrics`,
  :func:`settled_metrics`, :func:`model_metrics_delta`;
* the command line the tools share: :func:`add_server_arguments`, :func:`assign_free_ports`; :func:`run_tool`,
  which says in one line which make target installs a missing package.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from load_tests.corpus import DEFAULT_IMAGE_DIR
from load_tests.testkit.servers import (
    DEFAULT_READY_TIMEOUT_S,
    MetricKey,
    demo_checkpoint_dir,
    metric_sum,
    parse_metrics,
    running,
)
from ofa_serving.launcher import TritonServer, free_ports
from ofa_serving.triton_api import TritonHttp, scrape

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: The packages of the dev set (requirements/dev.txt, ``make setup-dev``) each kind of load tool imports.
REFERENCE_PACKAGES = ("modelscope", "fairseq", "transformers")
METRICS_PACKAGES = ("prometheus_client",)
PLOT_PACKAGES = ("matplotlib",)
# This project's own packages: a ModuleNotFoundError naming one of them is a bug, not a missing install.
_OWN_PACKAGES = {"ofa_captioning", "ofa_serving", "ofa_eval", "client", "load_tests"}


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


@dataclass
class ServerHandle:
    """Where the server of a tool run answers, and whether this run started it (then ``pid`` is its process).

    A tool may use a server it did not start (one already answering on its ports), so this holds the addresses,
    not a process; the process of a server a run starts is a :class:`~ofa_serving.launcher.TritonServer`.
    """

    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    started: bool
    model_dir: str | None = None
    log_file: str | None = None
    pid: int | None = None

    @classmethod
    def of(cls, server: TritonServer, started: bool = True) -> ServerHandle:
        """The handle of a :class:`~ofa_serving.launcher.TritonServer` (its PID when ``started`` by this run)."""
        host = "127.0.0.1" if server.host in ("", "0.0.0.0") else server.host
        return cls(
            host,
            server.http_port,
            server.grpc_port,
            server.metrics_port,
            started=started,
            model_dir=str(server.model_dir) if started and server.model_dir else None,
            log_file=str(server.log_file) if started and server.log_file else None,
            pid=server.pid if started else None,
        )

    @property
    def grpc_address(self) -> str:
        """``host:port`` of the gRPC endpoint, as ``TritonServer.grpc_address``."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the HTTP endpoint."""
        return f"http://{self.host}:{self.http_port}"

    def ready(self, timeout: float = 2.0) -> bool:
        """Whether the server answers ``GET /v2/health/ready`` with 200."""
        return TritonHttp(self.http_url, timeout=timeout).server_ready()

    def metrics(self, timeout: float = 5.0) -> dict[MetricKey, float]:
        """Triton's metrics now (:func:`scrape_metrics`)."""
        return scrape_metrics(self.host, self.metrics_port, timeout)


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
        args.http_port, args.grpc_port, args.metrics_port = free_ports(3, args.host)


@contextlib.contextmanager
def server_from_args(
    args: argparse.Namespace,
    ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
    log_file: Path | None = None,
    **server_kwargs,
) -> Iterator[ServerHandle]:
    """The server of a tool run, from the options of :func:`add_server_arguments` (after
    :func:`assign_free_ports`).

    A server already answering on ``--host``/``--http-port`` is used as is and left running. Otherwise, unless
    ``--no-start``, a :class:`~ofa_serving.launcher.TritonServer` (``--model-dir``, else ``OFA_MODEL_DIR``, else
    the demo checkpoint, built if missing; ``--model-repository``, ``--server-env``, ``--server-arg``, and
    ``server_kwargs``, e.g. ``response_cache_bytes``) runs for the block (:func:`running`: ready and warm inside
    it, stopped by its PID after it); its log goes to ``log_file``, by default
    ``<results-dir>/<name>_tritonserver.log``.
    """
    handle = ServerHandle(args.host, args.http_port, args.grpc_port, args.metrics_port, started=False)
    if handle.ready():
        yield handle
        return
    if args.no_start:
        raise RuntimeError(f"no Triton server answers on {handle.http_url} and starting one was not asked")
    server = TritonServer(
        model_repository=args.model_repository,
        model_dir=resolve_model_dir(args.model_dir),
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_file=log_file or args.results_dir / f"{args.name}_tritonserver.log",
        env=dict(item.split("=", 1) for item in args.server_env),
        extra_args=list(args.server_arg),
        **server_kwargs,
    )
    flags = f", flags {' '.join(server.extra_args)}" if server.extra_args else ""
    print(
        f"starting tritonserver (checkpoint {server.model_dir}{flags}, log {server.log_file}) ...", flush=True
    )
    with running(server, ready_timeout):
        yield ServerHandle.of(server)


def resolve_model_dir(model_dir: str | os.PathLike | None = None) -> Path:
    """``model_dir``, else ``OFA_MODEL_DIR``, else the demo checkpoint (``DEMO_CHECKPOINT``, built if missing)."""
    if model_dir:
        return Path(model_dir)
    if os.environ.get("OFA_MODEL_DIR"):
        return Path(os.environ["OFA_MODEL_DIR"])
    from ofa_captioning.demo_checkpoint import ensure_demo_checkpoint

    return Path(ensure_demo_checkpoint(demo_checkpoint_dir()))


# ---------------------------------------------------------------------------------------------- metrics


def scrape_metrics(host: str, metrics_port: int, timeout: float = 5.0) -> dict[MetricKey, float]:
    """Triton's metrics from ``http://host:metrics_port/metrics``, parsed (:func:`parse_metrics`)."""
    return parse_metrics(scrape(f"http://{host}:{metrics_port}/metrics", timeout))


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
    for key, counter in (
        ("queue_ms", "nv_inference_queue_duration_us"),
        ("compute_ms", "nv_inference_compute_infer_duration_us"),
        ("request_ms", "nv_inference_request_duration_us"),
    ):
        out[key] = round(delta[counter] / requests / 1000.0, 2) if requests else None
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
