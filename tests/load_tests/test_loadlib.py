"""Unit tests of the load-test and benchmark helpers (no server): corpus, statistics, metrics, reports."""

from __future__ import annotations

import csv
import http.server
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from load_tests import bench, bench_report, bench_served, run_load_test
from load_tests.corpus import UniqueImages
from load_tests.loadlib import REPO_ROOT, latency_summary, model_metrics_delta
from load_tests.testkit.servers import parse_metrics


def _encoded(fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_unique_images_are_distinct_and_decode_to_the_same_pixels(fmt):
    images = [("a", _encoded(fmt, 0)), ("b", _encoded(fmt, 1))]
    corpus = UniqueImages(images)

    sent = [corpus.next() for _ in range(6)]

    assert corpus.not_unique == []
    assert len({data for _, data in sent}) == 6  # never the same bytes twice: no response-cache hit
    assert [name for name, _ in sent] == ["a", "b"] * 3  # round robin
    for name, data in sent:
        original = dict(images)[name]
        assert data.startswith(original)
        np.testing.assert_array_equal(_pixels(data), _pixels(original))


def test_unique_images_off_and_undecodable_images_are_sent_unchanged():
    good, bad = _encoded("PNG", 2), b"not an image"

    assert {UniqueImages([("g", good)], unique=False).next()[1] for _ in range(3)} == {good}
    corpus = UniqueImages([("bad", bad), ("g", good)])
    assert corpus.not_unique == ["bad"]
    assert corpus.next() == ("bad", bad)
    assert corpus.next()[1] != good


def test_latency_summary_reports_milliseconds_and_linear_percentiles():
    latencies_s = [ms / 1000 for ms in range(1, 101)]  # 1 .. 100 ms

    summary = latency_summary(latencies_s)

    expected = np.percentile(np.arange(1, 101, dtype=float), [50, 95, 99])
    assert summary["count"] == 100
    assert summary["mean_ms"] == pytest.approx(50.5)
    assert [summary["p50_ms"], summary["p95_ms"], summary["p99_ms"]] == pytest.approx(expected.tolist())
    assert summary["max_ms"] == pytest.approx(100)
    assert latency_summary([])["p50_ms"] is None


def _scrape(count: int, execs: int, queue_us: int, compute_us: int, success: int, hits: int = 0) -> str:
    return f"""# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{{model="ofa",version="1"}} {count}
nv_inference_count{{model="preprocess",version="1"}} 999
nv_inference_exec_count{{model="ofa",version="1"}} {execs}
nv_inference_request_success{{model="ofa",version="1"}} {success}
nv_inference_queue_duration_us{{model="ofa",version="1"}} {queue_us}
nv_inference_compute_infer_duration_us{{model="ofa",version="1"}} {compute_us}
nv_cache_num_hits_per_model{{model="caption",version="1"}} {hits}
nv_gpu_utilization{{gpu_uuid="x"}} 0.5
"""


def test_parse_metrics_keeps_tritons_names_for_counters_gauges_and_summaries():
    text = _scrape(count=3, execs=1, queue_us=10, compute_us=20, success=3) + (
        "# TYPE nv_inference_request_summary_us summary\n"
        'nv_inference_request_summary_us_count{model="ofa",version="1"} 7\n'
        'nv_inference_request_summary_us{model="ofa",version="1",quantile="0.5"} 1500\n'
    )

    metrics = parse_metrics(text)

    # prometheus_client names counter samples <name>_total; Triton's names are kept.
    assert metrics[("nv_inference_count", frozenset({("model", "ofa"), ("version", "1")}))] == 3
    assert metrics[("nv_gpu_utilization", frozenset({("gpu_uuid", "x")}))] == 0.5
    assert (
        metrics[("nv_inference_request_summary_us_count", frozenset({("model", "ofa"), ("version", "1")}))]
        == 7
    )
    quantile = frozenset({("model", "ofa"), ("version", "1"), ("quantile", "0.5")})
    assert metrics[("nv_inference_request_summary_us", quantile)] == 1500
    assert not any(name.endswith("_total") for name, _labels in metrics)


def test_model_metrics_delta_derives_batch_size_and_per_request_times():
    before = parse_metrics(_scrape(count=10, execs=10, queue_us=1_000, compute_us=50_000, success=10))
    after = parse_metrics(
        _scrape(count=42, execs=14, queue_us=65_000, compute_us=370_000, success=42, hits=3)
    )

    ofa = model_metrics_delta(before, after, "ofa")

    assert ofa["nv_inference_count"] == 32 and ofa["nv_inference_exec_count"] == 4
    assert ofa["avg_batch"] == pytest.approx(32 / 4)
    assert ofa["queue_ms"] == pytest.approx(64_000 / 32 / 1000, abs=0.01)
    assert ofa["compute_ms"] == pytest.approx(320_000 / 32 / 1000, abs=0.01)
    assert model_metrics_delta(before, after, "caption")["nv_cache_num_hits_per_model"] == 3
    idle = model_metrics_delta(before, before, "ofa")
    assert idle["avg_batch"] is None and idle["queue_ms"] is None


def _history(path, rows):
    columns = ["Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s", "50%", "95%", "99%"]
    columns += ["Total Request Count", "Total Failure Count"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for t, users, total, p50 in rows:
            writer.writerow([t, users, "", "Aggregated", "N/A", 0, p50, p50 * 2, p50 * 3, total, 0])


def test_history_by_users_takes_throughput_from_request_totals(tmp_path):
    path = tmp_path / "h.csv"
    # 1 user for 6 s at 2 requests/s, then 4 users for 6 s at 5 requests/s; the spawning seconds are left out.
    rows = [(t, 1, 2 * t, 100) for t in range(6)] + [(t, 4, 10 + 5 * (t - 6), 400 + t) for t in range(6, 12)]
    rows.append((12, 0, 40, 0))  # Locust's last row after the users stopped
    _history(path, rows)

    steps = run_load_test.history_by_users(path, settle_s=2)

    assert [s["users"] for s in steps] == [1, 4]
    assert steps[0]["requests_per_s"] == pytest.approx(2.0)
    assert steps[1]["requests_per_s"] == pytest.approx(5.0)
    assert steps[1]["p50_ms"] == 411 and steps[1]["p95_ms"] == 822 and steps[1]["p99_ms"] == 1233
    png = tmp_path / "plot.png"
    run_load_test.plot(path, png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_history_by_users_ignores_transient_user_counts(tmp_path):
    path = tmp_path / "h.csv"
    # 1 user, a spawning row at 3 on the way to 4 users, 4 users, then 2 while the users stop: with the shape's
    # counts given, only the 1- and 4-user runs are steps; without them every count is one.
    rows = [(t, 1, 2 * t, 100) for t in range(6)] + [(6, 3, 12, 300)]
    rows += [(t, 4, 12 + 5 * (t - 7), 400) for t in range(7, 13)] + [(13, 2, 42, 400), (14, 0, 44, 0)]
    _history(path, rows)

    assert [s["users"] for s in run_load_test.history_by_users(path)] == [1, 3, 4, 2]
    steps = run_load_test.history_by_users(path, settle_s=2, expected=[1, 4])
    assert [s["users"] for s in steps] == [1, 4]
    assert steps[1]["requests_per_s"] == pytest.approx(5.0)


def test_verdict_fails_on_errors_on_no_traffic_and_on_slow_p95():
    def summary(requests, failures, p95):
        return {"total": {"requests": requests, "failures": failures, "p95_ms": p95}}

    assert run_load_test.verdict(summary(100, 0, 900.0), max_p95_ms=1000, locust_rc=0) == []
    assert run_load_test.verdict(summary(100, 1, 900.0), 1000, 0) == ["1 of 100 requests failed"]
    assert run_load_test.verdict(summary(0, 0, None), 1000, 0) == ["no request was sent"]
    assert "over the bound" in run_load_test.verdict(summary(100, 0, 1500.0), 1000, 0)[0]
    assert "locust exited with 2" in run_load_test.verdict(summary(100, 0, 900.0), 1000, 2)


def _row(path, setting, images_per_s, p50, **extra):
    return {
        "path": path,
        "setting": setting,
        "images": 10,
        "images_per_s": images_per_s,
        "p50_ms": p50,
        **extra,
    }


def test_bench_summary_computes_ratios_and_targets():
    rows = [
        _row("reference", "ref", 1.0, 1000.0),
        _row("engine", "b1", 4.0, 250.0, batch=1),
        _row("engine", "b8", 10.0, 800.0, batch=8),
        _row("served", "c1", 3.8, 280.0, concurrency=1, failures=0, cache_hits=0),
        _row("served", "c8", 9.5, 840.0, concurrency=8, failures=0, cache_hits=0),
    ]

    summary = bench_report.summarize(rows)

    assert summary["engine_best"] == "b8"
    assert summary["engine_best_vs_reference"] == pytest.approx(10.0)
    assert summary["served_c8_vs_engine_best"] == pytest.approx(0.95)
    assert summary["served_c1_p50_vs_engine_batch1_p50"] == pytest.approx(280 / 250, abs=1e-3)
    assert all(summary["targets"].values())
    assert rows[3]["vs_reference"] == pytest.approx(3.8)

    rows[4].update(images_per_s=8.0, cache_hits=2)
    missed = set(bench_report.verdict(bench_report.summarize(rows)))
    assert missed == {"served c8 images/s >= 90% of engine best", "no response-cache hit in served phases"}


def test_bench_options_and_recorded_configs():
    args = bench.parse_args(
        ["--model-repository", "/tmp/x", "--server-env", "OFA_TORCH_THREADS=1", "--report-only"]
    )
    assert (
        args.model_repository == "/tmp/x" and args.server_env == ["OFA_TORCH_THREADS=1"] and args.report_only
    )
    assert not bench.parse_args([]).report_only  # a missed target fails `make bench` by default

    configs = bench_served.model_configs(REPO_ROOT / "model_repository")

    assert {"caption", "preprocess", "ofa"} <= set(configs)
    assert "max_batch_size" in configs["ofa"] and "count" in configs["ofa"]


@pytest.mark.parametrize("tool", ["bench", "soak", "burst"])
def test_server_tools_share_the_server_options_and_pick_free_ports(tool):
    import importlib

    from load_tests.loadlib import assign_free_ports

    module = importlib.import_module(f"load_tests.{tool}")
    args = module.parse_args(["--host", "127.0.0.1", "--model-repository", "/tmp/variant"])
    assert args.name == tool and args.model_repository == "/tmp/variant"
    assert (args.http_port, args.grpc_port, args.metrics_port) == (0, 0, 0)
    assign_free_ports(args)
    ports = [args.http_port, args.grpc_port, args.metrics_port]
    assert all(ports) and len(set(ports)) == 3

    given = module.parse_args(["--http-port", "18000", "--grpc-port", "18001", "--metrics-port", "18002"])
    assign_free_ports(given)
    assert [given.http_port, given.grpc_port, given.metrics_port] == [18000, 18001, 18002]


def test_metric_sum_matches_labels_and_tells_absent_from_zero():
    from load_tests.testkit.servers import metric_sum

    metrics = parse_metrics(
        'nv_inference_request_failure{model="ofa",reason="BACKEND",version="1"} 2\n'
        'nv_inference_request_failure{model="ofa",reason="REJECTED",version="1"} 3\n'
        'nv_inference_request_failure{model="preprocess",reason="BACKEND",version="1"} 0\n'
    )

    assert metric_sum(metrics, "nv_inference_request_failure", model="ofa") == 5
    assert metric_sum(metrics, "nv_inference_request_failure", model="ofa", reason="REJECTED") == 3
    assert metric_sum(metrics, "nv_inference_request_failure", model="preprocess") == 0
    assert metric_sum(metrics, "nv_inference_request_failure", model="caption") is None
    assert metric_sum(metrics, "nv_inference_count", model="ofa") is None


def test_demo_checkpoint_dir_is_the_setting_under_the_checkout():
    from load_tests.testkit.servers import demo_checkpoint_dir

    assert demo_checkpoint_dir({}) == REPO_ROOT / "checkpoints" / "ofa-tiny-demo"
    assert demo_checkpoint_dir({"DEMO_CHECKPOINT": "elsewhere/demo"}) == REPO_ROOT / "elsewhere" / "demo"
    assert demo_checkpoint_dir({"DEMO_CHECKPOINT": "/abs/demo"}) == Path("/abs/demo")


class _Server:
    """Records the lifecycle calls of :func:`load_tests.testkit.servers.running`; ``fail`` makes it never get ready."""

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, []

    def start(self):
        self.calls.append("start")

    def wait_ready(self, timeout):
        self.calls.append(f"wait {timeout:g}")
        if self.fail:
            raise RuntimeError("not ready")
        return self

    def stop(self, timeout=None):
        self.calls.append(f"stop {timeout}")


def test_running_starts_waits_and_always_stops():
    from load_tests.testkit.servers import running

    server = _Server()
    with running(server, ready_timeout=7, stop_timeout=3) as inside:
        assert inside is server and server.calls == ["start", "wait 7"]
    assert server.calls[-1] == "stop 3"

    never_ready = _Server(fail=True)
    with pytest.raises(RuntimeError, match="not ready"), running(never_ready, ready_timeout=1):
        pass
    assert never_ready.calls == ["start", "wait 1", "stop 10"]  # stopped by its PID, not left behind


def test_a_tool_without_its_packages_names_the_make_target_in_one_line(capsys, monkeypatch):
    from load_tests.loadlib import run_tool

    monkeypatch.setattr("sys.argv", ["bench_engine.py"])
    ran = []
    assert run_tool(lambda: ran.append(1) or 0, "json", "no_such_package_for_this_test") == 2
    assert not ran  # checked before anything runs
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'no_such_package_for_this_test'" in err and "`make setup-dev`" in err

    def imports_late() -> int:
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    assert run_tool(imports_late) == 2
    assert (
        "bench_engine.py: needs the package 'transformers', which `make setup-dev`" in capsys.readouterr().err
    )

    def broken_own_import() -> int:  # a bug in the project, not a missing install: the traceback stays
        raise ModuleNotFoundError("No module named 'ofa_serving.nothing'", name="ofa_serving.nothing")

    with pytest.raises(ModuleNotFoundError):
        run_tool(broken_own_import)
    assert run_tool(lambda: 0, "json") == 0


class _Ready(http.server.BaseHTTPRequestHandler):
    """Answers Triton's readiness call with 200 (and anything else with 404)."""

    def do_GET(self):
        self.send_response(200 if self.path == "/v2/health/ready" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_tool_uses_the_server_answering_on_its_port_and_never_starts_one_with_no_start(tmp_path):
    from load_tests import burst
    from load_tests.loadlib import server_from_args
    from ofa_serving.launcher import free_ports

    answering = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=answering.serve_forever, daemon=True).start()
    port = answering.server_address[1]
    ports = ["--grpc-port", "1", "--metrics-port", "2", "--results-dir", str(tmp_path), "--no-start"]
    try:
        with server_from_args(burst.parse_args(["--http-port", str(port), *ports])) as server:
            assert (server.started, server.pid, server.http_url) == (False, None, f"http://127.0.0.1:{port}")
            assert server.ready()
    finally:
        answering.shutdown()
        answering.server_close()

    (silent,) = free_ports(1)
    with (
        pytest.raises(RuntimeError, match="starting one was not asked"),
        server_from_args(burst.parse_args(["--http-port", str(silent), *ports])),
    ):
        pass
    assert list(tmp_path.iterdir()) == []  # no server log: nothing was started


def test_bad_options_are_refused_with_exit_2_before_any_server_starts(tmp_path, capsys):
    from load_tests import soak

    no_server = ["--no-start", "--http-port", "1", "--results-dir", str(tmp_path)]
    assert soak.main(["--seconds", "20", *no_server]) == 2
    assert "two 30 s windows after the warm-up" in capsys.readouterr().err

    assert run_load_test.main(["--steps", "0,2", *no_server]) == 2
    assert "user steps must be positive integers" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no report, no server log


def test_load_test_checks_name_each_expectation_and_the_reasons_follow_them():
    summary = {"total": {"requests": 10, "failures": 2, "p95_ms": 1500.0}}

    checks = run_load_test.load_checks(summary, max_p95_ms=1000, locust_rc=1)

    assert {name: ok for name, ok, _ in checks} == {
        "locust exited with 0": False,
        "requests were sent": True,
        "no failed request": False,
        "p95 within 1000 ms": False,
    }
    assert run_load_test.verdict(summary, 1000, 1) == [
        "locust exited with 1",
        "2 of 10 requests failed",
        "p95 1500 ms is over the bound of 1000 ms",
    ]
