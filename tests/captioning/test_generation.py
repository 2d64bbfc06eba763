"""Generation settings, batching behaviour and API of the engine (no reference needed)."""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import pytest
import torch

from load_tests.testkit.parity import assert_same_results
from ofa_captioning.beam_search import (
    TOPK_BLOCK,
    BeamSearchSettings,
    beam_search,
    block_repeated_ngrams,
    row_topk,
)
from ofa_captioning.captioner import Caption, Captioner
from ofa_captioning.config import ModelConfig
from ofa_captioning.model import OFAModel


@pytest.fixture(scope="module")
def engine(demo_checkpoint) -> Captioner:
    return Captioner.from_pretrained(demo_checkpoint)


@pytest.fixture(scope="module")
def pixels(engine, image_corpus) -> torch.Tensor:
    return engine.preprocess([data for _, data in image_corpus[:4]])


@pytest.mark.parametrize(
    ("beam_size", "max_length", "message"),
    [
        (0, None, "beam_size must be between 1 and 16, got 0"),
        (17, None, "beam_size must be between 1 and 16, got 17"),
        (-3, None, "beam_size must be between 1 and 16, got -3"),
        (None, 0, "max_length must be between 1 and 64, got 0"),
        (None, 65, "max_length must be between 1 and 64, got 65"),
        (2.5, None, "beam_size must be an integer between 1 and 16"),
        ("5", None, "beam_size must be an integer between 1 and 16"),
        (True, None, "beam_size must be an integer between 1 and 16"),
    ],
)
def test_settings_out_of_bounds(engine, pixels, beam_size, max_length, message):
    with pytest.raises(ValueError, match=message):
        engine.validate_settings(beam_size, max_length)
    with pytest.raises(ValueError, match=message):
        engine.generate(pixels[:1], beam_size=beam_size, max_length=max_length)


def test_settings_defaults_and_bounds(engine):
    assert engine.validate_settings() == (5, 16)  # configuration.json's beam_search
    assert engine.validate_settings(1, 1) == (1, 1)
    assert engine.validate_settings(16, 64) == (16, 64)
    assert engine.validate_settings(np.int64(3), 10.0) == (3, 10)


def test_beam_size_changes_output(engine, pixels):
    one = engine.generate_hypotheses(pixels[:2], beam_size=1, max_length=8)
    five = engine.generate_hypotheses(pixels[:2], beam_size=5, max_length=8)
    assert [len(h) for h in one] == [1, 1] and [len(h) for h in five] == [5, 5]
    assert [h[0] for h in one] != [h[0] for h in five]
    # Beam search keeps 2x beam candidates per step, so a wider beam never finalises a worse best hypothesis here.
    assert all(f[0].score >= o[0].score - 1e-6 for f, o in zip(five, one, strict=True))


@pytest.mark.parametrize("max_length", [1, 3, 7, 20])
def test_max_length_bounds_hypotheses(engine, pixels, max_length):
    hyps = engine.generate_hypotheses(pixels[:1], beam_size=3, max_length=max_length)
    for per_image in hyps:
        assert per_image, "no hypothesis"
        for h in per_image:
            assert 2 <= len(h.tokens) <= max_length + 1 or max_length == 1  # min_len 1: at least one token
            assert h.tokens[-1] == engine.tokenizer.eos_id
            assert engine.tokenizer.eos_id not in h.tokens[:-1]
    if max_length == 1:
        assert all(len(h.tokens) == 2 for per_image in hyps for h in per_image)


def test_max_length_changes_caption_length(engine, pixels):
    short = engine.generate_hypotheses(pixels[:1], beam_size=2, max_length=3)[0][0]
    long = engine.generate_hypotheses(pixels[:1], beam_size=2, max_length=16)[0][0]
    assert len(short.tokens) <= 4 < len(long.tokens)


def test_numpy_torch_single_and_batch_inputs_agree(engine, pixels):
    batch = engine.generate(pixels, max_length=6)
    assert all(isinstance(c, Caption) and isinstance(c.text, str) and math.isfinite(c.score) for c in batch)
    assert engine.generate(pixels.numpy(), max_length=6) == batch  # same tensor values: bit-identical
    # Alone vs in a batch: other kernels may round the last bits differently (the parity rule, not ==).
    assert_same_results(engine.generate(pixels[1], max_length=6), batch[1:2])  # one image [3,S,S]
    assert_same_results([engine.generate(pixels[i : i + 1], max_length=6)[0] for i in range(4)], batch)
    assert engine.generate(pixels[:0]) == []


def test_caption_accepts_bytes_and_pil(engine, image_corpus):
    import io

    from PIL import Image

    _, data = image_corpus[0]
    from_bytes = engine.caption([data], max_length=6)
    assert engine.caption(data, max_length=6) == from_bytes
    assert engine.caption([Image.open(io.BytesIO(data))], max_length=6) == from_bytes
    assert all(ch not in from_bytes[0].text for ch in "<>_,.!?")  # punctuation stripped, as the reference


def test_bad_pixel_input(engine):
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        engine.generate(torch.zeros(2, 1, 480, 480))
    with pytest.raises(ValueError, match="floating point"):
        engine.generate(torch.zeros(1, 3, 480, 480, dtype=torch.uint8))
    with pytest.raises(TypeError):
        engine.generate([[0.0]])


def test_warmup(engine):
    engine.warmup(batch_sizes=(1, 2), max_length=2)


@contextlib.contextmanager
def _eos_boosted(engine: Captioner):
    """EOS logit +0.4 through the decoder's final LayerNorm bias: the demo's sentences end at different steps."""
    model = engine.model
    row = model.encoder.embed_tokens.weight[engine.tokenizer.eos_id]
    shift = row / row.norm() * (0.4 / float(row.norm()))
    with torch.no_grad():
        model.decoder.layer_norm.bias.add_(shift)
    try:
        yield
    finally:
        with torch.no_grad():
            model.decoder.layer_norm.bias.sub_(shift)


def test_finished_sentences_are_masked_not_dropped(engine, image_corpus):
    """Sentences ending at different steps keep their rows (every step after the first has images x beams rows,
    so its shapes never change), and each image's hypotheses equal those of the image searched alone."""
    pixels = engine.preprocess([data for _, data in image_corpus[:8]])
    model = engine.model
    rows_per_step: list[int] = []
    original = model.decode_step

    def counting(tokens, state):
        rows_per_step.append(tokens.shape[0])
        return original(tokens, state)

    with _eos_boosted(engine):
        model.decode_step = counting
        try:
            hyps = engine.generate_hypotheses(pixels)
        finally:
            del model.decode_step
        alone = [engine.generate_hypotheses(pixels[i : i + 1])[0] for i in (0, 3, 7)]
    ends = sorted(max(len(h.tokens) for h in per_image) for per_image in hyps)
    assert ends[0] < ends[-1], ends  # sentences really ended at different steps
    assert rows_per_step[0] == 8  # step 0: one row per image (its beams are identical)
    assert rows_per_step[1:] == [8 * 5] * (len(rows_per_step) - 1)
    assert len(rows_per_step) == ends[-1]  # one decoder call per step of the longest search
    assert_same_results([hyps[0], hyps[3], hyps[7]], alone)


def _reference_ngram_ban(history: list[int], n: int, step: int) -> set[int]:
    """fairseq's python NGramRepeatBlock for one row (history = tokens[0..step], the rest of the row is pad)."""
    row = history + [1] * 5
    grams: dict[tuple, list[int]] = {}
    for i in range(len(row) - n + 1):
        grams.setdefault(tuple(row[i : i + n - 1]), []).append(row[i + n - 1])
    if step + 2 - n < 0:
        return set()
    return set(grams.get(tuple(row[step + 2 - n : step + 1]), []))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_block_matches_reference_rule(n):
    rng = random.Random(n)
    for _ in range(200):
        step = rng.randrange(0, 12)
        history = [0] + [rng.randrange(4, 9) for _ in range(step)]  # small alphabet: many repeats
        lprobs = torch.zeros(1, 12)
        block_repeated_ngrams(lprobs, torch.tensor([history]), n, pad_id=1)
        banned = {i for i in range(12) if lprobs[0, i] == -math.inf} - {1}
        assert banned == _reference_ngram_ban(history, n, step) - {1}, (history, n)


def _rows_for_topk(width: int) -> torch.Tensor:
    """Rows that stress row_topk: plain noise, the best entries packed into one block or spread one per block,
    many exact ties, a row banned but for a few entries, entries in the columns after the last whole block."""
    gen = torch.Generator().manual_seed(width)
    noise = torch.randn(7, width, generator=gen)
    noise[1, 3 * TOPK_BLOCK : 3 * TOPK_BLOCK + 12] += 10  # the 12 best in one block
    noise[2, :: TOPK_BLOCK * 2] += 10  # one best entry per second block
    noise[3] = torch.randint(0, 4, (width,), generator=gen).float()  # ties everywhere
    noise[4] = -math.inf
    noise[4, [5, width // 2, width - 1]] = torch.tensor([-1.0, -2.0, -0.5])
    noise[5, -1] = 99.0  # the last column (after the last whole block when width is not a multiple)
    noise[6, width // 3] = math.nan
    return noise


@pytest.mark.parametrize("width", [59457, 4096, 64 * 40, 100])
@pytest.mark.parametrize("k", [1, 10, 20])
def test_row_topk_equals_torch_topk(width, k):
    scores = _rows_for_topk(width)
    values, columns = row_topk(scores, k)
    expected_values, _ = torch.topk(scores, k, dim=-1)
    assert values.shape == columns.shape == (scores.shape[0], k)
    # The same values in the same order (NaN first, as torch.topk ranks it); the columns hold those values.
    torch.testing.assert_close(values, expected_values, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(torch.gather(scores, 1, columns), values, equal_nan=True, rtol=0, atol=0)
    for row in range(scores.shape[0]):  # every column at most once per row
        assert len(set(columns[row].tolist())) == k
    assert torch.isnan(values[6, 0])
    assert columns[5, 0].item() == width - 1
    strided = scores.t().contiguous().t()  # the same rows, not contiguous in memory
    torch.testing.assert_close(row_topk(strided, k)[0], values, equal_nan=True, rtol=0, atol=0)


def test_beam_search_settings_validation():
    with pytest.raises(ValueError, match="min_len"):
        BeamSearchSettings(min_len=5, max_len_b=3)
    with pytest.raises(ValueError, match="beam_size"):
        BeamSearchSettings(beam_size=0)


def test_base_size_model_runs():
    """An OFA-base-shaped network (d_model 768, 6+6 layers, 12 heads, resnet101) builds, loads and generates."""
    config = ModelConfig(
        vocab_size=2000,  # the vocabulary only sizes the embedding; kept small for speed
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
        resnet_type="resnet101",
    )
    torch.manual_seed(0)
    model = OFAModel(config)
    model.load_state_dict(model.state_dict(), strict=True)
    model.prepare_for_inference()
    ids = torch.tensor([[0, 10, 11, 12, 2]] * 2)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        enc = model.encode(ids, images)
        hyps = beam_search(model, enc, BeamSearchSettings(beam_size=2, max_len_b=3))
    assert enc.last_hidden_state.shape == (2, 16 + 5, 768)
    assert all(len(h) == 2 for h in hyps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_reduced_precision_agrees_with_fp32(demo_checkpoint, image_corpus, dtype):
    images = [data for _, data in image_corpus]
    cpu = Captioner.from_pretrained(demo_checkpoint)
    gpu = Captioner.from_pretrained(demo_checkpoint, device="cuda", dtype=dtype)
    assert gpu.device.type == "cuda" and gpu.dtype == dtype
    want = cpu.caption(images)
    got = gpu.caption(images)
    same = sum(a.text == b.text for a, b in zip(want, got, strict=True))
    assert same >= 0.9 * len(images), (same, len(images))
    assert all(math.isfinite(c.score) for c in got)
    assert [c.text for c in gpu.caption(images[:8])] == [c.text for c in got[:8]]  # batching on GPU too
