"""A short Locust run against the real server, through ``make load-test``'s driver, so the locustfile can't rot.

Runs ``load_tests/run_load_test.py`` (Locust headless with ``load_tests/locustfile.py``) for a few seconds with
2 users, one gRPC and one HTTP, against the session's tritonserver, then checks what Locust wrote: both request
types succeeded, nothing failed, the final statistics agree with the server's own count of ``caption`` requests
(each request counted exactly once), the p95 bound was derived from a lone request's latency, and the CSVs, the
HTML report, the plot and the summary exist. A run with an undecodable image checks that failures are reported
with the server's message and make the run fail. ``make bench`` in miniature runs every path, the open loop
included, and fails on the target it is made to miss.
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


def _final(path: Path) -> dict[str, dict]:
    """The locustfile's final statistics by request type, the total as ``Aggregated``."""
    data = json.loads(path.read_text())
    return {**{e["type"]: e for e in data["entries"]}, "Aggregated": data["total"], "errors": data["errors"]}


def _caption_successes(server) -> float:
    from load_tests.loadlib import model_metric, scrape_metrics

    return model_metric(
        scrape_metrics(server.host, server.metrics_port), "nv_inference_request_success", "caption"
    )


def test_locust_grpc_and_http_users_succeed(load_server, image_corpus, tmp_path):
    images = _images(tmp_path / "images", image_corpus)
    results = tmp_path / "results"
    before = _caption_successes(load_server)

    # The bound is derived (no --max-p95-ms); a wide factor keeps the noisy machine from deciding the verdict.
    run = _run_driver(
        load_server,
        images,
        results,
        *("--duration", "6", "--steps", "2", "--protocol", "both", "--bound-factor", "1000"),
    )

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = _final(results / "load_final.json")
    assert set(rows) == {"grpc", "http", "Aggregated", "errors"}, rows.keys()
    for kind in ("grpc", "http"):
        assert rows[kind]["requests"] > 0, f"no {kind} request completed"
        assert rows[kind]["failures"] == 0
        assert rows[kind]["avg_content_length"] > 4  # caption text + the 4-byte score
    total = rows["Aggregated"]["requests"]
    assert total == rows["grpc"]["requests"] + rows["http"]["requests"]
    assert rows["Aggregated"]["failures"] == 0 and rows["errors"] == []
    # Exactly one Locust request event per request, the last second's included: the server's count (the lone
    # requests that derive the bound, 1 warm-up + 3, come before the run).
    assert _caption_successes(load_server) - before == total + 4
    # Locust's own CSV, rewritten once a second during the run: it may lag behind the final statistics.
    with open(results / "load_stats.csv", newline="") as handle:
        aggregated = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    assert int(aggregated["Request Count"]) <= total
    with open(results / "load_failures.csv", newline="") as handle:
        assert len(list(csv.reader(handle))) == 1  # header only
    summary = json.loads((results / "load_summary.json").read_text())
    assert summary["passed"] is True and summary["total"]["requests"] == total
    bound = summary["bound"]
    assert bound["source"].startswith("derived: 1000 x 2 users") and bound["probe"]["count"] == 3
    assert bound["max_p95_ms"] == pytest.approx(1000 * 2 * bound["probe"]["p50_ms"], rel=1e-3)
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
        *("--beam-size", "5", "--max-length", "16", "--max-p95-ms", "600000"),
    )

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = _final(results / "load_final.json")
    total = rows["Aggregated"]["requests"]
    assert total > 0 and rows["Aggregated"]["failures"] == 0
    assert _caption_successes(load_server) - before == total
    assert "2 workers connected" in run.stdout + run.stderr


def test_locust_reports_server_errors_and_fails_the_run(load_server, tmp_path):
    images = tmp_path / "bad"
    images.mkdir()
    (images / "broken.png").write_bytes(b"this is not an image at all")
    results = tmp_path / "results"

    # A fixed bound: the lone-request probe that derives one would itself fail on this image.
    run = _run_driver(
        load_server,
        images,
        results,
        *("--duration", "3", "--steps", "1", "--protocol", "grpc", "--max-p95-ms", "600000"),
    )

    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    rows = _final(results / "load_final.json")
    assert rows["grpc"]["requests"] > 0
    assert rows["grpc"]["failures"] == rows["grpc"]["requests"]
    assert rows["errors"], "the failure was not recorded"
    # The server's status and message reach Locust's report (not a bare "InferenceServerException()").
    assert "INVALID_ARGUMENT" in rows["errors"][0]["error"], rows["errors"][0]
    summary = json.loads((results / "load_summary.json").read_text())
    assert summary["passed"] is False and any("failed" in reason for reason in summary["reasons"])
    assert "FAIL" in run.stderr


def test_bench_runs_every_path_and_fails_on_a_missed_target(load_server, image_corpus, tmp_path):
    """``make bench`` in miniature: every path (the open loop at 1 request/s for 2 s), tiny counts, against the
    session's server; a p99 bound of 1 ms, which no caption meets, makes it miss the open-loop target."""
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
        *("--open-loop-rates", "1", "--open-loop-seconds", "2", "--open-loop-p99-ms", "1"),
    ]

    run = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)

    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((results / "bench.json").read_text())
    open_loop_target = "open loop: highest rate held (p99 <= 1 ms) >= 90% of engine best"
    assert result["summary"]["targets"][open_loop_target] is False
    assert f"[FAIL] {open_loop_target}" in run.stdout
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
    # The open loop: 2 requests due at 0 and 1 s, both answered, counted once by the server; none under 1 ms.
    (row,) = result["open_loop"]["rows"]
    assert row["offered"] == 2 and row["completed"] == 2 and row["failures"] == row["not_sent"] == 0
    assert row["held"] is False and row["why_not_held"][0].startswith("p99 ")
    assert row["cache_hits"] == 0 and row["ofa_avg_batch"] >= 1
    assert result["open_loop"]["highest_held_per_s"] is None
    assert (results / "bench_open_loop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Highest rate held: **none**" in table
