"""configuration.json generator settings of the family, against ModelScope's generator on the demo checkpoint.

Each test writes a copy of the demo checkpoint (files linked) whose configuration.json sets the generator fields
under test, loads it in the engine and in ModelScope's ``OfaForAllTasks`` (which passes ``model.beam_search`` to
its ``SequenceGenerator``) and compares hypotheses, captions and scores with the one tie-aware rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from load_tests.testkit.reference import Reference, assert_tie_aware_parity, engine_results
from ofa_captioning.captioner import Caption, Captioner

pytestmark = pytest.mark.reference


def demo_variant(demo_checkpoint: Path, out: Path, beam_search: dict, **model: object) -> Path:
    """The demo checkpoint with configuration.json's ``model.beam_search`` (and ``model`` fields) updated."""
    out.mkdir(parents=True, exist_ok=True)
    for f in demo_checkpoint.iterdir():
        if f.is_file() and f.name != "configuration.json" and not f.name.startswith("."):
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((demo_checkpoint / "configuration.json").read_text())
    cfg["model"]["beam_search"].update(beam_search)
    cfg["model"].update(model)
    (out / "configuration.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def pictures(image_corpus) -> list[bytes]:
    return [image_corpus[i][1] for i in (3, 12)]


def _check(path: Path, pictures: list[bytes], num: int = 1):
    ref = Reference(path)
    engine = Captioner.from_pretrained(path)
    pixels = ref.pixels(pictures)
    want = ref.results(pixels, num_return_sequences=num)
    got = engine_results(engine, pixels, num_captions=num)
    diverged = assert_tie_aware_parity(ref, pixels, got, want)
    assert len(diverged) <= 1, diverged
    return engine, ref, pixels, got, want


def test_beam8_max_len_b_128(demo_checkpoint, tmp_path, pictures):
    """The Chinese MUGE model's evaluation settings: beam 8, max_len_b 128 (above the request bound of 64)."""
    # One 128 px image: up to 129 steps of ModelScope's generator, whose every step attends over all patches
    # (at 480 px this test took 21 minutes on a loaded 2-core machine).
    beam = {"beam_size": 8, "max_len_b": 128}
    path = demo_variant(demo_checkpoint, tmp_path / "muge", beam, patch_image_size=128)
    engine, *_, got, want = _check(path, pictures[:1])
    assert engine.validate_settings() == (8, 128)
    with pytest.raises(ValueError, match="max_length must be between 1 and 128"):
        engine.validate_settings(None, 129)


def test_beam10_temperature_len_penalty(demo_checkpoint, tmp_path, pictures):
    """The huge model's evaluation settings: beam 10, temperature 0.98, len_penalty 0.98 (2 captions each)."""
    settings = {"beam_size": 10, "temperature": 0.98, "len_penalty": 0.98}
    path = demo_variant(demo_checkpoint, tmp_path / "huge", settings, num_return_sequences=2)
    engine, ref, pixels, got, want = _check(path, pictures, num=2)
    # Temperature changes the scores (the reference's are recomputed with it, so this is not a tautology).
    plain = Captioner.from_pretrained(demo_checkpoint).generate_hypotheses(pixels, beam_size=10)
    assert abs(plain[0][0].score - got[0][0].score) > 1e-3


def test_max_len_a_unk_penalty_unnormalised_scores(demo_checkpoint, tmp_path, pictures):
    """max_len_a (times the prompt's length with <s> and </s>), a negative unk_penalty (favours <unk>),
    normalize_scores false, temperature above 1, min_len 2 and a bigram block, all as ModelScope's generator."""
    settings = {
        "beam_size": 4,
        "max_len_a": 0.5,
        "max_len_b": 3,
        "min_len": 2,
        "no_repeat_ngram_size": 2,
        "unk_penalty": -4.0,
        "normalize_scores": False,
        "temperature": 1.3,
    }
    path = demo_variant(demo_checkpoint, tmp_path / "gen", settings)
    engine, ref, pixels, got, want = _check(path, pictures, num=4)
    src_len = len(ref.source_tokens())
    max_len = int(0.5 * src_len + 3)
    assert max_len > 3 and max(len(h.tokens) for hyps in got for h in hyps) == max_len + 1
    assert any(3 in h.tokens for hyps in got for h in hyps)  # <unk> was boosted into the hypotheses
    # Unnormalised: the score is the plain sum of log-probabilities, so longer hypotheses score lower here.
    assert all(h.score < -1.0 for hyps in got for h in hyps)


def test_n_best_api_matches_reference_lists(demo_checkpoint, tmp_path, pictures):
    """generate_n_best (default: configuration.json's num_return_sequences) returns the reference's lists."""
    path = demo_variant(demo_checkpoint, tmp_path / "nbest", {}, num_return_sequences=3)
    engine, ref, pixels, got, want = _check(path, pictures, num=3)
    lists = engine.generate_n_best(pixels)
    assert lists == [[Caption(h.text, h.score) for h in hyps] for hyps in got]
    assert [len(x) for x in lists] == [3, 3]
    assert engine.generate_n_best(pixels, num_captions=1) == [x[:1] for x in lists]
    assert [c[0] for c in lists] == engine.generate(pixels)
    with pytest.raises(ValueError, match="num_captions must be between 1 and 5"):
        engine.generate_n_best(pixels, num_captions=6)
