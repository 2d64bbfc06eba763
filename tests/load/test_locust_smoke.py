"""A short Locust run against the real server, through ``make load-test``'s driver, so the locustfile can't rot.

Runs ``load_tests/run_load_test.py`` (Locust headless with ``load_tests/locustfile.py``) for a few seconds with
2 users, one gRPC and one HTTP, against the session's tritonserver, then checks what Locust wrote: both request
types succeeded, nothing failed, the CSV agrees with the server's own count of ``caption`` requests (each request
counted exactly once), and the HTML report, the plot and the summary exist. A second run with an undecodable
image checks that failures are reported with the server's message and make the run fail.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
DRIVER = REPO_ROOT / "load_tests" / "run_load_test.py"


def _images(folder: Path, corpus: list[tuple[str, bytes]], count: int = 4) -> Path:
    """Write a few JPEG/PNG images of the corpus into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, data in corpus:
        if Path(name).suffix.lower() in (".jpg", ".jpeg", ".png") and written < count:
            (folder / Path(name).name).write_bytes(data)
            written += 1
    assert written, "the image corpus has no JPEG/PNG image"
    return folder


def _run_driver(
    server, image_dir: Path, results: Path, *extra: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(DRIVER),
        "--no-start",
        "--host",
        server.host,
        "--http-port",
        str(server.http_port),
        "--grpc-port",
        str(server.grpc_port),
        "--metrics-port",
        str(server.metrics_port),
        "--image-dir",
        str(image_dir),
        "--results-dir",
        str(results),
        # Short generations keep the run to a few seconds on a CPU and exercise the optional inputs.
        "--beam-size",
        "2",
        "--max-length",
        "4",
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def _stats_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["Type"] or "Aggregated": row for row in csv.DictReader(handle)}


def _caption_successes(server) -> float:
    from loadlib import model_metric, scrape_metrics

    return model_metric(
        scrape_metrics(server.host, server.metrics_port), "nv_inference_request_success", "caption"
    )


def test_locust_grpc_and_http_users_succeed(load_server, image_corpus, tmp_path):
    images = _images(tmp_path / "images", image_corpus)
    results = tmp_path / "results"
    before = _caption_successes(load_server)

    run = _run_driver(load_server, images, results, "--duration", "6", "--steps", "2", "--protocol", "both")

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = _stats_rows(results / "load_stats.csv")
    assert set(rows) == {"grpc", "http", "Aggregated"}, rows.keys()
    for kind in ("grpc", "http"):
        assert int(rows[kind]["Request Count"]) > 0, f"no {kind} request completed"
        assert int(rows[kind]["Failure Count"]) == 0
        assert float(rows[kind]["Average Content Size"]) > 4  # caption text + the 4-byte score
    total = int(rows["Aggregated"]["Request Count"])
    assert total == int(rows["grpc"]["Request Count"]) + int(rows["http"]["Request Count"])
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    # Exactly one Locust request event per request: the CSV's count is the server's count.
    assert _caption_successes(load_server) - before == total
    with open(results / "load_failures.csv", newline="") as handle:
        assert len(list(csv.reader(handle))) == 1  # header only
    summary = json.loads((results / "load_summary.json").read_text())
    assert summary["passed"] is True and summary["total"]["requests"] == total
    assert summary["ofa_metrics"]["nv_inference_count"] >= total
    assert (results / "load.html").stat().st_size > 0
    assert (results / "load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in run.stdout


def test_distributed_mode_counts_every_request(load_server, image_corpus, tmp_path):
    """One master and two worker processes: the requests in flight when the shape ends are counted too."""
    images = _images(tmp_path / "images", image_corpus)
    results = tmp_path / "results"
    before = _caption_successes(load_server)

    # Full-length generations (batches of 8 take seconds on a CPU), so requests are in flight when the shape ends.
    run = _run_driver(
        load_server,
        images,
        results,
        *("--duration", "6", "--steps", "8", "--protocol", "grpc", "--processes", "2"),
        *("--beam-size", "5", "--max-length", "16"),
    )

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = _stats_rows(results / "load_stats.csv")
    total = int(rows["Aggregated"]["Request Count"])
    assert total > 0 and int(rows["Aggregated"]["Failure Count"]) == 0
    assert _caption_successes(load_server) - before == total
    assert "2 workers connected" in run.stdout + run.stderr


def test_locust_reports_server_errors_and_fails_the_run(load_server, tmp_path):
    images = tmp_path / "bad"
    images.mkdir()
    (images / "broken.png").write_bytes(b"this is not an image at all")
    results = tmp_path / "results"

    run = _run_driver(load_server, images, results, "--duration", "3", "--steps", "1", "--protocol", "grpc")

    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    rows = _stats_rows(results / "load_stats.csv")
    assert int(rows["grpc"]["Request Count"]) > 0
    assert rows["grpc"]["Failure Count"] == rows["grpc"]["Request Count"]
    with open(results / "load_failures.csv", newline="") as handle:
        failures = list(csv.DictReader(handle))
    assert failures, "the failure was not recorded"
    # The server's status and message reach Locust's report (not a bare "InferenceServerException()").
    assert "INVALID_ARGUMENT" in failures[0]["Error"], failures[0]
    summary = json.loads((results / "load_summary.json").read_text())
    assert summary["passed"] is False and any("failed" in reason for reason in summary["reasons"])
    assert "FAIL" in run.stderr


def test_bench_runs_every_path_and_writes_its_tables(load_server, image_corpus, tmp_path):
    """``make bench`` in miniature: every path, tiny counts, against the session's server."""
    images = _images(tmp_path / "images", image_corpus, count=3)
    results = tmp_path / "bench"
    cmd = [
        sys.executable,
        str(REPO_ROOT / "load_tests" / "bench.py"),
        "--no-start",
        *("--http-port", str(load_server.http_port), "--grpc-port", str(load_server.grpc_port)),
        *("--metrics-port", str(load_server.metrics_port), "--image-dir", str(images)),
        *("--results-dir", str(results), "--beam-size", "2", "--max-length", "4"),
        *("--reference-images", "1", "--engine-images", "1", "--batches", "2", "--batch-images", "2"),
        *("--concurrency", "1,2", "--served-requests", "4", "--min-served-requests", "2", "--warmup", "1"),
    ]

    run = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((results / "bench.json").read_text())
    phases = {(p["path"], p.get("batch"), p.get("concurrency")): p for p in result["phases"]}
    assert set(phases) == {
        ("reference", None, None),
        ("engine", 1, None),
        ("engine", 2, None),
        ("served", None, 1),
        ("served", None, 2),
    }
    for phase in phases.values():
        assert phase["images"] > 0 and phase["images_per_s"] > 0 and phase["p50_ms"] > 0
    for concurrency in (1, 2):
        served = phases[("served", None, concurrency)]
        assert served["failures"] == 0 and served["cache_hits"] == 0
        # Triton saw exactly the timed requests (warm-up is outside the metrics delta).
        assert served["metrics"]["caption"]["nv_inference_request_success"] == served["images"]
        assert served["ofa_avg_batch"] >= 1 and served["ofa_compute_ms"] > 0
    summary = result["summary"]
    assert summary["engine_best_vs_reference"] > 0 and summary["served_c1_p50_vs_engine_batch1_p50"] > 0
    table = (results / "bench.md").read_text()
    assert table.count("\n| reference |") == 1 and table.count("\n| served |") == 2
