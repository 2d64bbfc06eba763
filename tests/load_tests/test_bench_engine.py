"""bench_engine's measurement, profile, arithmetic floor and report, without the reference timing run."""

from __future__ import annotations

import time

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
    # 5x of a 2.0 s reference leaves 0.4 s: 55 % of the peak; 10x of 2.2 s leaves 0.22 s: all of it.
    assert b1["target"] == 5.0 and b1["target_share_of_peak"] == pytest.approx(0.55)
    assert b8["target"] == 10.0 and b8["target_share_of_peak"] == pytest.approx(1.0)
    assert b4["target"] is None and b4["target_share_of_peak"] is None


def test_a_row_without_a_measured_peak_gets_no_floor():
    gmac = {"resnet_gmac": 1.0, "encoder_layers_gmac": 1.0, "beam_search_gmac": 1.0}
    assert bench_engine.floors([_row("bfloat16", 8, 2.0, 0.2)], gmac, {"float32": 100.0}) == []


def test_the_report_says_when_a_target_needs_more_than_the_peak():
    gmac = {"resnet_gmac": 15.0, "encoder_layers_gmac": 5.0, "beam_search_gmac": 2.0}
    rows = [_row("float32", 1, 2.0, 0.4), _row("float32", 8, 2.0, 0.3)]
    res = _report(
        arithmetic=gmac,
        peak_gmac_per_s={"float32": 100.0},
        floors=bench_engine.floors(rows, gmac, {"float32": 100.0}),
    )

    text = bench_engine.markdown(res)

    assert "float32 100 GMAC/s" in text
    assert "| float32 | 1 | 0.220 | 9.1x | 55 % | 5x | 55 % |" in text
    assert "| float32 | 8 | 0.220 | 9.1x | 73 % | 10x | 110 % (above the peak) |" in text


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
