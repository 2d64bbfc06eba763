"""The decode loop before and after: the current engine against the engine of commit 0741503
(``load_tests.testkit.baseline``) on the demo checkpoint, same pixels, compared by the parity rule (same tokens
and text, scores within 1e-4).

Each side's encoder runs once on the eight-image batch (the encoder is most of a call's time and is not what
changes here); each case then runs both sides' beam searches on their own encoder outputs and compares the
n-best lists as token hypotheses and as captions. Batch 1 goes through the public API end to end
(``generate_hypotheses``, ``generate_n_best``). Where the checkout has no git history the baseline cannot be
built and every test here skips with that reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from load_tests.testkit.baseline import BaselineUnavailable, baseline_module, load_baseline
from load_tests.testkit.parity import assert_same_results
from ofa_captioning.beam_search import beam_search
from ofa_captioning.captioner import Captioner


@pytest.fixture(scope="module")
def engine(demo_checkpoint) -> Captioner:
    return Captioner.from_pretrained(demo_checkpoint)


@pytest.fixture(scope="module")
def baseline(demo_checkpoint):
    """0741503's ``Captioner`` on the demo checkpoint (loaded once per module), or a skip saying why not. Tests
    ask for it before the current engine, so that a skip costs no engine load."""
    try:
        return load_baseline(demo_checkpoint)
    except BaselineUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def pixels(engine, image_corpus) -> torch.Tensor:
    return engine.preprocess([data for _, data in image_corpus[:8]])


@pytest.fixture(scope="module")
def encoded(baseline, engine, pixels) -> dict:
    """Each side's encoder output of the eight images, and its beam search."""
    out = {}
    for name, side, search in (
        ("current", engine, beam_search),
        ("0741503", baseline, baseline_module("generate").beam_search),
    ):
        with torch.inference_mode():
            ids = side._prompt_ids.unsqueeze(0).expand(pixels.shape[0], -1)
            out[name] = (side, side.model.encode(ids, pixels), search)
    return out


def _results(encoded: dict, name: str, beam: int, length: int) -> tuple[list, list]:
    """One side's n-best lists for the eight images: hypotheses (tokens, score) and captions (text, score)."""
    side, encoder_out, search = encoded[name]
    hyps = search(side.model, encoder_out, side.search_settings(beam, length))
    captions = [[(side.postprocess(side.tokenizer.decode(h.tokens)), h.score) for h in hs] for hs in hyps]
    return hyps, captions


def _assert_same(encoded: dict, beam: int, length: int) -> list[list]:
    """Both sides' n-best lists equal; returns the current engine's hypotheses."""
    hyps, captions = _results(encoded, "current", beam, length)
    want_hyps, want_captions = _results(encoded, "0741503", beam, length)
    assert len(want_hyps) == 8 and all(len(hs) == beam for hs in want_hyps)  # full n-best lists to compare
    assert_same_results(hyps, want_hyps)
    assert_same_results(captions, want_captions)
    return hyps


def test_batch_of_one_through_the_public_api(baseline, engine, pixels):
    one = pixels[:1]
    want = baseline.generate_hypotheses(one)
    assert len(want) == 1 and len(want[0]) == engine.default_beam_size
    assert_same_results(engine.generate_hypotheses(one), want)
    assert_same_results(
        engine.generate_n_best(one, num_captions=5), baseline.generate_n_best(one, num_captions=5)
    )


def test_batch_of_eight_default_settings(encoded, engine):
    _assert_same(encoded, engine.default_beam_size, engine.default_max_length)


def test_batch_of_eight_beam_3_max_length_8(encoded):
    hyps = _assert_same(encoded, 3, 8)
    assert (
        max(len(h.tokens) for hs in hyps for h in hs) <= 8 + 1
    )  # the length limit really applied (EOS added)


@contextlib.contextmanager
def _boosted_eos(*captioners: Captioner) -> Iterator[None]:
    """EOS's logit raised by 0.4 in every decoder (through the final layer norm's bias), so that sentences end
    at different steps and finished rows leave (or are masked in) the batch."""
    shifts = []
    for c in captioners:
        row = c.model.encoder.embed_tokens.weight[c.tokenizer.eos_id]
        shifts.append((c.model.decoder.layer_norm.bias, row / row.norm() * (0.4 / float(row.norm()))))
    with torch.no_grad():
        for bias, shift in shifts:
            bias.add_(shift)
    try:
        yield
    finally:
        with torch.no_grad():
            for bias, shift in shifts:
                bias.sub_(shift)


def test_batch_whose_rows_finish_at_different_steps(baseline, engine, encoded):
    with _boosted_eos(engine, baseline):
        hyps = _assert_same(encoded, engine.default_beam_size, engine.default_max_length)
    ends = [max(len(h.tokens) for h in hs) for hs in hyps]
    assert len(set(ends)) >= 2, ends  # sentences really finished at different steps
