"""bench_engine's measurement, profile, arithmetic floor and report, without the reference timing run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from load_tests import bench_engine, engine_profile


def _row(dtype: str, batch: int, reference_s: float, engine_s: float) -> dict:
    return {
        "dtype": dtype,
        "batch_size": batch,
        "reference_s_per_image": reference_s,
        "engine_s_per_image": engine_s,
    }


def _report(**fields) -> dict:
    """bench_engine's result dict for one image, nothing measured unless ``fields`` says so."""
    return {
        "images": ["a"],
        "settings": {"beam_size": 5, "max_length": 16},
        "torch": torch.__version__,
        "threads": 2,
        "cpus": 2,
        "load_average_before": [0.1, 0.1, 0.1],
        "load_average_after": [0.1, 0.1, 0.1],
        "rows": [],
        "profile": [],
        "floors": [],
        "bfloat16_agreement": None,
        "gpu": [],
        "checks": {},
        **fields,
    }


def test_floor_is_the_arithmetic_at_the_peak_and_each_target_gets_its_share_of_it():
    gmac = {"resnet_gmac": 15.0, "encoder_layers_gmac": 5.0, "beam_search_gmac": 2.0}
    rows = [_row("float32", 1, 2.0, 0.4), _row("float32", 8, 2.2, 0.3), _row("float32", 4, 2.0, 0.3)]

    floors = bench_engine.floors(rows, gmac, {"float32": 100.0})

    b1, b8, b4 = floors
    assert b1["floor_s_per_image"] == pytest.approx(0.22)
    assert b1["ceiling_speedup"] == pytest.approx(2.0 / 0.22)
    assert b1["engine_share_of_peak"] == pytest.approx(0.22 / 0.4)
    # 5x of a 2.0 s reference leaves 0.4 s: 55 % of the peak; 8x of 2.2 s leaves 0.275 s: 80 % of it.
    assert b1["target"] == 5.0 and b1["target_share_of_peak"] == pytest.approx(0.55)
    assert b8["target"] == 8.0 and b8["target_share_of_peak"] == pytest.approx(0.8)
    assert b4["target"] is None and b4["target_share_of_peak"] is None


def test_a_row_without_a_measured_peak_gets_no_floor():
    gmac = {"resnet_gmac": 1.0, "encoder_layers_gmac": 1.0, "beam_search_gmac": 1.0}
    assert bench_engine.floors([_row("bfloat16", 8, 2.0, 0.2)], gmac, {"float32": 100.0}) == []


def test_the_report_says_when_a_target_needs_more_than_the_peak():
    gmac = {"resnet_gmac": 15.0, "encoder_layers_gmac": 5.0, "beam_search_gmac": 2.0}
    rows = [_row("float32", 1, 2.0, 0.4), _row("float32", 8, 1.6, 0.3)]
    res = _report(
        arithmetic=gmac,
        peak_gmac_per_s={"float32": 100.0},
        floors=bench_engine.floors(rows, gmac, {"float32": 100.0}),
    )

    text = bench_engine.markdown(res)

    assert "float32 100 GMAC/s" in text
    assert "| float32 | 1 | 0.220 | 9.1x | 55 % | 5x | 55 % |" in text
    assert "| float32 | 8 | 0.220 | 7.3x | 73 % | 8x | 110 % (above the peak) |" in text


def test_beam_profile_tells_the_output_projection_from_the_layers(demo_checkpoint):
    from ofa_captioning.beam_search import beam_search
    from ofa_captioning.captioner import Captioner

    engine = Captioner.from_pretrained(demo_checkpoint)
    model = engine.model
    pixels = engine.normalize_pixels(torch.zeros(1, 3, 480, 480, dtype=torch.uint8))
    settings = engine.search_settings(2, 3)
    with torch.inference_mode():
        enc = model.encode(engine._prompt_ids.unsqueeze(0), pixels)
        hyps = beam_search(model, enc, settings)
    steps = max(len(h.tokens) for h in hyps[0])  # as stage_profile counts them

    rows = {r["family"]: r for r in engine_profile.beam_op_profile(model, enc, settings, steps)}

    layers = model.config.decoder_layers
    # One projection per step; per layer and step: self q|k|v and out, cross q and out, fc1 and fc2 (plus, once
    # per search, the cross-attention keys/values and the position-bias projections).
    assert rows["output projection"]["calls_per_step"] == pytest.approx(1.0)
    assert 6 * layers <= rows["linear layers"]["calls_per_step"] < 6 * layers + 3
    assert rows["output projection"]["ms_per_step"] > 0
    counted = engine_profile.operators_per_step(model, enc, settings, steps)
    assert counted > 6 * layers
    # The same count as the profile's row, within what one profiled run differs from another (lazy caches).
    assert counted == pytest.approx(rows["operators per step"]["calls_per_step"], rel=0.05)


class _FakeSide:
    """A reference (``caption``) or engine (``generate``) that logs its calls and captions row i as "cap i"."""

    def __init__(self, log: list, name: str, wrong_row: int | None = None):
        self.log, self.name, self.wrong_row = log, name, wrong_row

    def _captions(self, pixels):
        self.log.append((self.name, pixels.shape[0]))
        rows = pixels[:, 0, 0, 0].long().tolist()
        return [(f"cap {i}" if i != self.wrong_row else "other", float(i)) for i in rows]

    def caption(self, pixels):
        return self._captions(pixels)

    def generate(self, pixels):
        from types import SimpleNamespace

        return [SimpleNamespace(text=t, score=s) for t, s in self._captions(pixels)]


def test_timed_rows_alternate_the_sides_chunk_by_chunk_and_count_identical_captions():
    log: list = []
    pixels = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    engines = {"float32": _FakeSide(log, "f32"), "bfloat16": _FakeSide(log, "bf16", wrong_row=3)}

    rows = bench_engine.timed_rows(_FakeSide(log, "ref"), engines, pixels, [1, 4])

    assert log[:3] == [("ref", 1), ("f32", 1), ("bf16", 1)]
    assert log[15:] == [("ref", 4), ("f32", 4), ("bf16", 4), ("ref", 1), ("f32", 1), ("bf16", 1)]
    by_key = {(r["dtype"], r["batch_size"]): r for r in rows}
    assert set(by_key) == {("float32", 1), ("bfloat16", 1), ("float32", 4), ("bfloat16", 4)}
    assert by_key["float32", 4]["identical_captions"] == 5 and by_key["float32", 4]["parity"]
    assert by_key["bfloat16", 4]["identical_captions"] == 4 and not by_key["bfloat16", 4]["parity"]
    assert by_key["float32", 4]["calls"] == 2


def test_the_kept_memory_pass_gets_its_own_table():
    def row(speedup):
        return {
            **_row("float32", 8, 2.0 * speedup / 10, 0.2),
            "reference_images_per_s": 1.0,
            "engine_images_per_s": speedup,
            "speedup": speedup,
            "identical_captions": 1,
            "max_score_diff": 0.0,
            "load_average": 1.0,
        }

    res = _report(rows=[row(10.5)], kept_memory_rows=[row(5.5)])

    text = bench_engine.markdown(res)

    first, kept = text.split("freed memory kept for reuse")
    assert "**10.50x**" in first and "**5.50x**" not in first
    assert "**5.50x**" in kept


def test_timed_calls_stops_at_the_time_bound_after_the_least_calls():
    calls = []

    def slow(chunk):
        calls.append(chunk)
        time.sleep(0.02)
        return [f"cap {x}" for x in chunk]

    bounded = bench_engine.timed_calls(
        {"engine": slow}, [[i, i] for i in range(50)], seconds=0.01, min_calls=3
    )

    assert bounded.calls == 3 and calls == [[0, 0], [1, 1], [2, 2]]
    side = bounded.sides["engine"]
    assert side.images == 6 and side.outputs[:2] == ["cap 0", "cap 0"] and len(side.latencies) == 3
    assert bounded.wall_s >= side.seconds >= 0.06

    unbounded = bench_engine.timed_calls({"engine": slow}, [[i] for i in range(4)])
    assert unbounded.calls == 4 and unbounded.sides["engine"].images == 4


def test_the_tool_refuses_more_images_than_the_corpus_has(tmp_path, capsys, monkeypatch):
    from load_tests.testkit import images

    corpus = images.image_corpus()
    monkeypatch.setattr(
        "load_tests.testkit.reference.Reference", lambda *a: pytest.fail("loaded the reference")
    )

    code = bench_engine.main(["--images", str(len(corpus) + 1), "--results-dir", str(tmp_path)])

    assert code == 2 and f"--images: the corpus has {len(corpus)} images" in capsys.readouterr().err
    assert not (tmp_path / "bench_engine.json").exists()


def test_json_names_where_the_report_goes():
    from pathlib import Path

    from load_tests import tool

    args = tool.parse_args(bench_engine.TOOL, ["--json", "/tmp/x/engine.json"])
    assert (args.results_dir, args.name) == (Path("/tmp/x"), "engine")
    default = tool.parse_args(bench_engine.TOOL, [])
    assert default.name == "bench_engine" and default.json is None
    to_stdout = tool.parse_args(bench_engine.TOOL, ["--json", "-"])
    assert to_stdout.json == "-" and to_stdout.name == "bench_engine"


# ----------------------------------------------------------------------------------- decode step vs 0741503


def _hyps(lengths: list[int], score: float = -1.0) -> list[list]:
    """One image per length, each with one finished hypothesis of that many tokens."""
    from types import SimpleNamespace

    return [[SimpleNamespace(tokens=tuple(range(n)), score=score, text=None)] for n in lengths]


def test_decode_step_row_alternates_the_sides_and_divides_by_each_sides_steps(monkeypatch):
    log: list[str] = []

    def search(name: str, seconds: float, lengths: list[int], score: float):
        def run(model, encoder_out, settings):
            log.append(name)
            time.sleep(seconds)
            return _hyps(lengths, score)

        return run

    sides = {
        bench_engine.CURRENT: bench_engine.SearchSide("m", "e", "s", search("cur", 0.01, [4, 10], -1.0)),
        bench_engine.BASELINE: bench_engine.SearchSide("m", "e", "s", search("base", 0.04, [5, 8], -1.0)),
    }
    profiled = []
    monkeypatch.setattr(
        engine_profile,
        "operators_per_step",
        lambda model, enc, settings, steps, search: profiled.append(steps) or {10: 250.0, 8: 1000.0}[steps],
    )

    row = bench_engine.decode_step_row(8, sides, repeats=3)

    assert (
        log == ["cur", "base"] * 5
    )  # one untimed call each, three alternating, one with its operators counted
    assert row["decoder_steps"] == 10 and row["baseline_decoder_steps"] == 8
    assert 1.0 <= row["current_ms_per_step"] < 4.0  # 10 ms over 10 steps, plus the machine's noise
    assert 5.0 <= row["baseline_ms_per_step"] < 20.0  # 40 ms over 8 steps
    assert row["ratio"] == pytest.approx(row["current_ms_per_step"] / row["baseline_ms_per_step"])
    assert row["current_operators_per_step"] == 250.0 and row["baseline_operators_per_step"] == 1000.0
    assert profiled == [10, 8]
    assert row["current_dispatched_per_step"] == 0.0  # the stand-in searches call no operator
    assert row["same_hypotheses"] is False  # different tokens


def test_decode_step_row_without_a_baseline_times_the_current_engine_only(monkeypatch):
    side = bench_engine.SearchSide("m", "e", "s", lambda *a: _hyps([3]))
    monkeypatch.setattr(engine_profile, "operators_per_step", lambda *a: 120.0)

    row = bench_engine.decode_step_row(1, {bench_engine.CURRENT: side}, repeats=2)

    assert row["decoder_steps"] == 3 and row["current_operators_per_step"] == 120.0
    assert row["ratio"] is None and row["baseline_ms_per_step"] is None and row["same_hypotheses"] is None


def _decode_row(batch: int, ratio: float | None, ops: float, same: bool | None = True) -> dict:
    return {
        "batch_size": batch,
        "repeats": 5,
        "decoder_steps": 17,
        "current_ms_per_step": 6.0,
        "current_operators_per_step": ops,
        "current_dispatched_per_step": 270.0,
        "baseline_decoder_steps": None if ratio is None else 17,
        "baseline_ms_per_step": None if ratio is None else 6.0 / ratio,
        "baseline_operators_per_step": None if ratio is None else 1090.0,
        "baseline_dispatched_per_step": None if ratio is None else 299.0,
        "ratio": ratio,
        "same_hypotheses": None if ratio is None else same,
        "load_average": 1.0,
    }


def test_decode_step_targets_are_0_6x_of_the_baseline_and_300_operators_per_step():
    result = {
        "baseline": "0741503",
        "baseline_unavailable": None,
        "rows": [_decode_row(1, 0.55, 280.0), _decode_row(8, 0.65, 301.0, same=False)],
    }

    checks = bench_engine.decode_step_checks(result)

    assert checks == {
        "float32 decode step at batch 1 <= 0.6x of 0741503's (same run)": True,
        "float32 n-best lists at batch 1 equal to 0741503's": True,
        "float32 decode step at batch 1 <= 300 operators": True,
        "float32 decode step at batch 8 <= 0.6x of 0741503's (same run)": False,
        "float32 n-best lists at batch 8 equal to 0741503's": False,
        "float32 decode step at batch 8 <= 300 operators": False,
    }
    assert bench_engine.decode_step_checks(None) == {}  # skipped: nothing to check


def test_an_unavailable_baseline_is_a_red_fail_never_a_pass(capsys, monkeypatch):
    from load_tests import tool
    from load_tests.testkit import baseline

    def no_history(*args, **kwargs):
        raise baseline.BaselineUnavailable("baseline 0741503 unavailable (no git history)")

    monkeypatch.setattr(baseline, "load_baseline", no_history)
    engine, search, why = bench_engine._baseline_engine(Path("unused"))
    assert engine is None and search is None and why == "baseline 0741503 unavailable (no git history)"
    result = {"baseline": "0741503", "baseline_unavailable": why, "rows": [_decode_row(1, None, 250.0)]}

    checks = bench_engine.decode_step_checks(result)

    assert checks == {
        "baseline 0741503 unavailable (no git history)": False,
        "float32 decode step at batch 1 <= 300 operators": True,
    }
    assert tool.print_verdict(checks) is False
    assert "[FAIL] baseline 0741503 unavailable (no git history)" in capsys.readouterr().out
    text = bench_engine.markdown(_report(decode_step=result))
    assert "baseline 0741503 unavailable (no git history): only the current engine is shown." in text
    assert "| 1 | 17 | 6.00 |  |  | 250 |  | 270 /  |  | 5 | 1.00 |" in text


def test_the_report_shows_both_decode_steps_and_their_ratio():
    result = {"baseline": "0741503", "baseline_unavailable": None, "rows": [_decode_row(8, 0.5, 280.0)]}

    text = bench_engine.markdown(_report(decode_step=result))

    assert "Decode step, float32, beam 5: the current engine vs 0741503's in the same run" in text
    assert "| 8 | 17 | 6.00 | 12.00 | 0.50 | 280 | 1090 | 270 / 299 | yes | 5 | 1.00 |" in text
    assert "Decode step" not in bench_engine.markdown(_report(decode_step=None))


def test_decode_step_options():
    from load_tests import tool

    args = tool.parse_args(bench_engine.TOOL, [])
    assert args.no_decode_step is False and args.decode_step_repeats == 5
    args = tool.parse_args(bench_engine.TOOL, ["--no-decode-step", "--decode-step-repeats", "2"])
    assert args.no_decode_step is True and args.decode_step_repeats == 2
    with pytest.raises(SystemExit):
        tool.parse_args(bench_engine.TOOL, ["--decode-step-repeats", "0"])


def test_dispatched_per_step_counts_the_operators_a_call_dispatches():
    import torch

    x = torch.ones(4)

    def three_ops():
        return ((x * 2) + 1).sum()

    assert engine_profile.dispatched_per_step(three_ops, 1) == 3.0
    assert engine_profile.dispatched_per_step(three_ops, 2) == 1.5
