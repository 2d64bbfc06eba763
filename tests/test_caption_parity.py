"""Caption parity with ModelScope's reference (OFAModel + OFATokenizer + SequenceGenerator + its pre/postprocessing).

Random weights give the same caption for many images, so captions alone prove little: the scores (which do
differ per image) must agree within 1e-4 as well, and for a subset every finished hypothesis is compared.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from ofa_captioning.captioner import Captioner

pytestmark = pytest.mark.reference

ATOL = 1e-4
MIXED_BATCH = (0, 2, 5, 7, 9, 11, 13, 16)  # eight different formats, sizes and modes


@pytest.fixture(scope="module")
def engine(demo_checkpoint) -> Captioner:
    return Captioner.from_pretrained(demo_checkpoint)


@pytest.fixture(scope="module")
def corpus_bytes(image_corpus) -> list[bytes]:
    return [data for _, data in image_corpus]


@pytest.fixture(scope="module")
def ref_batch1(reference, corpus_bytes):
    """Reference (caption, score) per image, each image run on its own through the whole reference path."""
    return [reference.caption_images([data])[0] for data in corpus_bytes]


def _assert_same(names, ref, got):
    mismatches = [
        (name, r, (c.text, c.score))
        for name, r, c in zip(names, ref, got, strict=True)
        if r[0] != c.text or not math.isclose(r[1], c.score, rel_tol=0, abs_tol=ATOL)
    ]
    assert not mismatches, mismatches


def test_batch1_parity(engine, image_corpus, corpus_bytes, ref_batch1):
    assert len(corpus_bytes) >= 12
    got = [engine.caption([data])[0] for data in corpus_bytes]
    _assert_same([n for n, _ in image_corpus], ref_batch1, got)
    # Scores differ per image: they carry the image (and would expose a preprocessing error).
    assert len({round(s, 4) for _, s in ref_batch1}) >= len(ref_batch1) // 2


def test_mixed_batch_parity(engine, reference, image_corpus, corpus_bytes, ref_batch1):
    picks = [corpus_bytes[i] for i in MIXED_BATCH]
    ref = reference.caption_images(picks)
    got = engine.caption(picks)
    names = [image_corpus[i][0] for i in MIXED_BATCH]
    _assert_same(names, ref, got)
    # Batching changes nothing: the same as each image alone.
    _assert_same(names, [ref_batch1[i] for i in MIXED_BATCH], got)


def test_all_hypotheses_match(engine, reference, corpus_bytes):
    """Every finished hypothesis (tokens and score, best first) equals the reference generator's."""
    pixels = reference.pixels([corpus_bytes[i] for i in (2, 3, 9, 13)])
    ref = reference.generate(pixels)
    got = engine.generate_hypotheses(pixels)
    lengths = set()
    for ref_hyps, hyps in zip(ref, got, strict=True):
        assert len(hyps) == len(ref_hyps) == 5
        for r, h in zip(ref_hyps, hyps, strict=True):
            assert list(h.tokens) == r["tokens"].tolist()
            assert math.isclose(h.score, float(r["score"]), abs_tol=ATOL)
            lengths.add(len(h.tokens))
    # The demo checkpoint lets EOS compete, so hypotheses finish at different steps (the finalisation logic runs).
    assert len(lengths) >= 2, lengths


@pytest.mark.parametrize(("beam_size", "max_length"), [(1, None), (3, 6), (8, 3), (5, 1)])
def test_settings_parity(engine, reference, corpus_bytes, beam_size, max_length):
    pixels = reference.pixels([corpus_bytes[i] for i in (3, 15)])
    ref = reference.caption(pixels, beam_size=beam_size, max_length=max_length)
    got = engine.generate(pixels, beam_size=beam_size, max_length=max_length)
    _assert_same(["a", "b"], ref, got)


def test_engine_pixels_equal_reference_pixels(engine, reference, corpus_bytes):
    """The engine's own preprocessing feeds the same pixels the reference computes (end-to-end sanity)."""
    picks = [corpus_bytes[i] for i in MIXED_BATCH]
    assert torch.equal(engine.preprocess(picks), reference.pixels(picks))


@contextlib.contextmanager
def boosted_eos(*biases: torch.Tensor, eos_row: torch.Tensor, logit_offset: float = 0.3):
    """Raise EOS's logit by ``logit_offset`` (via the final decoder LayerNorm bias) while the block runs."""
    direction = eos_row / eos_row.norm()
    shift = direction * (logit_offset / float(eos_row.norm()))
    with torch.no_grad():
        for bias in biases:
            bias.add_(shift)
    try:
        yield
    finally:
        with torch.no_grad():
            for bias in biases:
                bias.sub_(shift)


def test_early_finishing_parity(engine, reference, corpus_bytes):
    """With EOS boosted in both models, sentences finish at different steps and leave the batch: same result."""
    picks = [corpus_bytes[i] for i in MIXED_BATCH[:5]]
    pixels = reference.pixels(picks)
    eos = engine.tokenizer.eos_id
    with boosted_eos(
        engine.model.decoder.layer_norm.bias,
        reference.model.decoder.layer_norm.bias,
        eos_row=engine.model.encoder.embed_tokens.weight[eos].detach().clone(),
    ):
        ref_hyps = reference.generate(pixels)
        got_hyps = engine.generate_hypotheses(pixels)
    ends = [max(len(h.tokens) for h in hyps) for hyps in got_hyps]
    assert min(ends) < 17 and len(set(ends)) >= 2, ends  # sentences really ended at different steps
    for ref_list, hyps in zip(ref_hyps, got_hyps, strict=True):
        assert [list(h.tokens) for h in hyps] == [r["tokens"].tolist() for r in ref_list]
        for r, h in zip(ref_list, hyps, strict=True):
            assert math.isclose(h.score, float(r["score"]), abs_tol=ATOL)
