"""Helpers the tests, the load tests and the benchmarks share: one way to start a server, read its metrics and
find the demo checkpoint.

* :func:`demo_checkpoint_dir`: where the demo checkpoint lives (the ``DEMO_CHECKPOINT`` setting of
  :class:`~ofa_serving.settings.ServerSettings`, relative paths taken from the checkout's root);
* :func:`started` and :func:`running`: the lifecycle of a :class:`~ofa_serving.launcher.TritonServer` with a
  ready timeout of the caller's choosing (start, wait until ready and warm, stop by its PID);
* :func:`parse_metrics` and :func:`metric_sum`: Triton's Prometheus text, parsed by ``prometheus_client``'s
  parser (``prometheus_client`` is a test dependency, imported on first use).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from ofa_serving.launcher import TritonServer, repo_root
from ofa_serving.settings import ServerSettings, load_settings

__all__ = ["MetricKey", "demo_checkpoint_dir", "metric_sum", "parse_metrics", "running", "started"]

#: A metric series: its name and its labels.
MetricKey = tuple[str, frozenset[tuple[str, str]]]

DEFAULT_READY_TIMEOUT_S = 600.0  # model load + warm-up on a busy 2-core machine


def demo_checkpoint_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The demo checkpoint's directory: the ``DEMO_CHECKPOINT`` setting, under the checkout's root when relative."""
    path = load_settings(ServerSettings, environ=environ).demo_checkpoint
    return path if path.is_absolute() else repo_root() / path


def started(server: TritonServer, ready_timeout: float = DEFAULT_READY_TIMEOUT_S) -> TritonServer:
    """Start ``server`` and wait until it is ready; stop it (by its PID) if it does not get there."""
    server.start()
    try:
        return server.wait_ready(ready_timeout)
    except BaseException:
        server.stop(timeout=10)
        raise


@contextlib.contextmanager
def running(
    server: TritonServer, ready_timeout: float = DEFAULT_READY_TIMEOUT_S, stop_timeout: float | None = None
) -> Iterator[TritonServer]:
    """``with running(server) as s:`` the server, ready, inside the block; stopped by its PID after it."""
    started(server, ready_timeout)
    try:
        yield server
    finally:
        server.stop(timeout=stop_timeout)


def parse_metrics(text: str) -> dict[MetricKey, float]:
    """Prometheus text exposition -> ``{(name, frozenset(labels)): value}``.

    Parsed with ``prometheus_client.parser.text_string_to_metric_families``. That parser names a counter's
    samples ``<family>_total`` (the OpenMetrics convention) whatever the exposition called them; Triton's counters
    (``nv_inference_count``, ...) carry no such suffix, so counter samples are keyed by their family name, which
    is the name Triton exposes. ``_created`` samples are left out.
    """
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[MetricKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if family.type == "counter":
                if name == family.name + "_created":
                    continue
                if name == family.name + "_total":
                    name = family.name
            values[(name, frozenset(sample.labels.items()))] = float(sample.value)
    return values


def metric_sum(metrics: Mapping[MetricKey, float], name: str, **labels: str) -> float | None:
    """Sum of the series of metric ``name`` whose labels include ``labels`` (e.g. ``model="ofa"``); ``None``
    when no series matches."""
    wanted = set(labels.items())
    values = [v for (n, series), v in metrics.items() if n == name and wanted <= series]
    return sum(values) if values else None
