"""Unit tests (no server) of the benchmarks that can fail: the open-loop scheduler and curve, the derived latency
bounds, ``make bench``'s exit codes and its refusal to run the GPU benchmark without CUDA."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
from PIL import Image

from load_tests import bench, bench_report, bench_served, openloop, run_load_test


class FakeClock:
    """A clock that only moves when the code under test sleeps (or a test advances it)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_schedule_is_a_constant_rate_with_the_offered_count():
    assert openloop.schedule(2.0, 3.0) == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert openloop.schedule(0.3, 10.0) == pytest.approx([0.0, 10 / 3, 20 / 3])
    assert len(openloop.schedule(1.5, 2.0)) == 3  # floor(3.0), not 2 from rounding 1.5 * 2.0 down
    assert openloop.schedule(10.0, 0.05) == [0.0]  # at least one request
    for rate, seconds in ((0, 1), (-1, 1), (1, 0)):
        with pytest.raises(ValueError):
            openloop.schedule(rate, seconds)


def test_run_rate_sends_on_schedule_and_counts_latency_from_the_due_time():
    clock = FakeClock()
    sent_at = []

    def start(i, done):  # the server answers each request 0.25 s after it was sent
        sent_at.append(clock.now)
        clock.now += 0.25
        done(None)

    run = openloop.run_rate(start, 2.0, 2.0, clock=clock, sleep=clock.sleep, drain_s=0)

    assert run.offered == 4 and run.failures == run.not_sent == run.unfinished == 0
    # Sent at 0, 0.5, 1.0, 1.5 s: the answer of each came before the next was due.
    assert [t - 100.0 for t in sent_at] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert run.latencies_s == pytest.approx([0.25] * 4)


def test_run_rate_does_not_hide_a_slow_sender_or_server():
    clock = FakeClock()

    def start(i, done):  # each send blocks the sender for 1 s: requests leave late
        clock.now += 1.0
        done(None if i != 2 else RuntimeError("refused"))

    run = openloop.run_rate(start, 4.0, 1.0, clock=clock, sleep=clock.sleep, drain_s=0)

    # Due at 0, 0.25, 0.5, 0.75 s; answered at 1, 2, 3, 4 s: latency from the due time, not the late send.
    assert run.latencies_s == pytest.approx([1.0, 1.75, 3.25])
    assert run.failures == 1 and "refused" in run.errors[0]
    assert run.max_send_lag_s == pytest.approx(2.25)


def test_run_rate_caps_requests_in_flight_and_counts_unanswered_ones():
    clock = FakeClock()
    pending = []

    run = openloop.run_rate(
        lambda i, done: pending.append(done),
        5.0,
        1.0,
        max_in_flight=2,
        clock=clock,
        sleep=clock.sleep,
        drain_s=0,
    )

    assert run.offered == 5 and run.not_sent == 3 and run.unfinished == 2 and run.latencies_s == []
    row = openloop.rate_row(run, p99_bound_ms=1000)
    assert row["held"] is False
    assert any("not sent" in r for r in row["why_not_held"]) and any(
        "unanswered" in r for r in row["why_not_held"]
    )


def _row(rate: float, p99_ms: float, bound_ms: float = 1000.0, failures: int = 0) -> dict:
    run = openloop.RateRun(rate=rate, seconds=10, offered=int(rate * 10))
    run.latencies_s = [p99_ms / 1000.0] * run.offered
    run.failures = failures
    run.wall_s = 10.0
    return openloop.rate_row(run, bound_ms)


def test_rate_rows_and_the_highest_rate_held():
    rows = [_row(1.0, 400), _row(2.0, 900), _row(3.0, 1500), _row(4.0, 800)]

    assert [r["held"] for r in rows] == [True, True, False, True]
    assert rows[2]["why_not_held"] == ["p99 1500 ms > 1000 ms"]
    assert rows[0]["achieved_per_s"] == pytest.approx(1.0) and rows[0]["p99_ms"] == pytest.approx(400)
    # 4/s passed after 3/s failed: noise past overload, not capacity.
    assert openloop.highest_held(rows) == 2.0
    assert openloop.highest_held([_row(1.0, 2000)]) is None
    assert openloop.highest_held([_row(1.0, 10, failures=1)]) is None


def test_rates_from_explicit_list_or_fractions_of_the_engine():
    assert openloop.rates_from("2,0.5,1", "0.5", None) == [0.5, 1.0, 2.0]
    assert openloop.rates_from(None, "0.5,1.0,0.25", 4.0) == [1.0, 2.0, 4.0]
    with pytest.raises(ValueError):
        openloop.rates_from(None, "0.5", None)
    with pytest.raises(ValueError):
        openloop.rates_from("1,-2", "0.5", None)


def test_plot_curve_writes_a_png(tmp_path):
    png = openloop.plot_curve(
        [_row(1.0, 400), _row(2.0, 1500)], tmp_path / "curve.png", "test", reference_rate=2.5
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _open_loop(held_per_s, bound_ms=5000.0, failures=0):
    rows = [_row(1.0, 400, bound_ms, failures)]
    return {"rows": rows, "p99_bound_ms": bound_ms, "highest_held_per_s": held_per_s, "reference_rate": None}


def _rows():
    """Engine rows as the phases make them: batch 1 at 2 images/s (0.5 s a call), batch 8 at 4 (2 s a call)."""
    return [
        bench_report.phase_result("engine", "b1", [0.5] * 4, 4, 2.0, batch=1),
        bench_report.phase_result("engine", "b8", [2.0] * 2, 16, 4.0, batch=8),
    ]


def test_open_loop_target_is_90_percent_of_the_engines_best():
    met = bench_report.summarize(_rows(), _open_loop(3.6))
    missed = bench_report.summarize(_rows(), _open_loop(3.0))
    none_held = bench_report.summarize(_rows(), _open_loop(None))

    name = "open loop: highest rate held (p99 <= 5000 ms) >= 90% of engine best"
    assert met["targets"][name] is True and met["open_loop_held_vs_engine_best"] == pytest.approx(0.9)
    assert bench_report.verdict(missed) == [name]
    assert name in bench_report.verdict(none_held)
    assert "open loop: no request failed" in bench_report.verdict(
        bench_report.summarize(_rows(), _open_loop(3.6, failures=1))
    )


def test_open_loop_bound_is_derived_from_the_engines_latency():
    args = argparse.Namespace(open_loop_p99_ms=None, open_loop_factor=2.0)

    bound, source = bench_served.open_loop_bound(args, _rows())

    assert bound == pytest.approx(4000.0)  # 2 x the p50 of batch 8, the engine's best throughput
    assert "batch 8" in source
    args.open_loop_p99_ms = 750
    assert bench_served.open_loop_bound(args, _rows()) == (750.0, "--open-loop-p99-ms")
    args.open_loop_p99_ms = None
    with pytest.raises(SystemExit, match="--open-loop-p99-ms"):
        bench_served.open_loop_bound(args, [])


def test_load_test_bound_is_derived_from_a_lone_requests_latency(monkeypatch):
    assert run_load_test.derived_bound(400.0, 16, 1.5) == pytest.approx(9600.0)
    with pytest.raises(ValueError):
        run_load_test.derived_bound(0.0, 16)

    args = run_load_test.parse_args(["--steps", "1,4", "--bound-factor", "2"])
    assert args.max_p95_ms is None  # no fixed bound unless asked
    monkeypatch.setattr(run_load_test, "probe_latency", lambda a: {"p50_ms": 300.0, "count": 3})
    bound = run_load_test.latency_bound(args, 4)
    assert bound["max_p95_ms"] == pytest.approx(2400.0) and bound["source"].startswith("derived: 2 x 4 users")

    fixed = run_load_test.parse_args(["--max-p95-ms", "5000"])
    assert run_load_test.latency_bound(fixed, 16) == {"max_p95_ms": 5000.0, "source": "--max-p95-ms"}


@pytest.fixture
def bench_inputs(tmp_path, demo_checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    (images / "a.png").write_bytes(buffer.getvalue())
    return [
        "--image-dir",
        str(images),
        "--model-dir",
        str(demo_checkpoint),
        "--results-dir",
        str(tmp_path / "r"),
    ]


def _fake_phases(monkeypatch, served_rate: float):
    monkeypatch.setattr(bench, "engine_phases", lambda model_dir, images, args: _rows())
    served = [
        bench_report.phase_result(
            "served", "c8", [2.1] * 8, 8, 8 / served_rate, concurrency=8, failures=0, cache_hits=0
        )
    ]
    monkeypatch.setattr(bench, "bench_served", lambda corpus, args, engine_rows: (served, {}, None))


@pytest.mark.parametrize(
    ("served_rate", "extra", "code"),
    [(3.9, [], 0), (2.0, [], 1), (2.0, ["--report-only"], 0)],
    ids=["targets-met", "target-missed", "missed-report-only"],
)
def test_bench_exits_non_zero_when_a_target_is_missed(
    monkeypatch, capsys, bench_inputs, served_rate, extra, code
):
    _fake_phases(monkeypatch, served_rate)

    assert bench.main([*bench_inputs, "--reference-images", "0", *extra]) == code

    out = capsys.readouterr().out
    c8 = "served c8 images/s >= 90% of engine best"
    assert (f"[FAIL] {c8}" in out) == (served_rate < 3.6) and (f"[ok] {c8}" in out) == (served_rate >= 3.6)
    assert out.count("[ok] ") + out.count("[FAIL] ") == 3  # the targets the phases allow


def test_open_loop_without_the_engine_needs_its_rates_and_bound_up_front(monkeypatch, capsys, bench_inputs):
    ran = []
    monkeypatch.setattr(bench, "reference_phase", lambda *a: ran.append("reference") or [])
    assert bench.main([*bench_inputs, "--skip-engine", "--open-loop-rates", "1"]) == 2
    assert not ran and "--open-loop-p99-ms" in capsys.readouterr().err
    args = bench.parse_args(["--skip-engine", "--open-loop-rates", "1", "--open-loop-p99-ms", "900"])
    assert bench.check_arguments(args) is None and (args.open_loop_rates, args.open_loop_p99_ms) == (
        "1",
        900.0,
    )
    assert bench.check_arguments(bench.parse_args(["--skip-engine", "--skip-open-loop"])) is None


def test_bench_fails_when_no_target_could_be_checked(monkeypatch, capsys, bench_inputs):
    assert bench.main([*bench_inputs, "--reference-images", "0", "--skip-engine", "--skip-served"]) == 1
    assert "no check ran" in capsys.readouterr().out


def test_gpu_bench_refuses_clearly_without_cuda(monkeypatch, capsys, bench_inputs):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ran = []
    monkeypatch.setattr(bench, "engine_phases", lambda *a: ran.append("engine") or [])
    monkeypatch.setattr(bench, "bench_served", lambda *a: ran.append("served") or ([], {}, None))

    code = bench.main([*bench_inputs, "--device", "cuda", "--dtype", "float16"])

    assert code == 2 and ran == []
    err = capsys.readouterr().err
    assert (
        "bench: refused: --device cuda" in err and "sees no CUDA device" in err and "Nothing was run" in err
    )


def test_gpu_bench_runs_the_started_server_on_cuda_too(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = bench.parse_args(["--device", "cuda", "--dtype", "float16", "--server-env", "OFA_DTYPE=bfloat16"])

    assert bench.check_device(args) is None
    assert args.engine_device == "cuda" and args.engine_dtype == "float16"
    assert args.server_env == ["OFA_DTYPE=bfloat16", "OFA_DEVICE=cuda"]  # an explicit server setting wins
