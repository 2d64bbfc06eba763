"""Reduced precision: derived inference weights are computed from the float32 weights and rounded once; float16
on the CPU against float32; the encoder's float16 overflow clamp (ModelScope's)."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch

from ofa_captioning import transformer
from ofa_captioning.captioner import Captioner
from ofa_captioning.images import preprocess_images
from ofa_captioning.transformer import clamp_fp16_overflow

from .test_dtypes import record_beam_search


@pytest.fixture(scope="module")
def engines(demo_checkpoint: Path) -> tuple[Captioner, Captioner]:
    return Captioner.from_pretrained(demo_checkpoint), Captioner.from_pretrained(
        demo_checkpoint, dtype=torch.bfloat16
    )


def _fold64(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return conv.weight.double() * scale[
        :, None, None, None
    ], bn.bias.double() - bn.running_mean.double() * scale


def test_batchnorm_folded_before_the_cast(engines):
    fp32, bf16 = engines
    assert bf16.model.encoder.embed_images.conv1.weight.dtype == torch.bfloat16
    block32 = fp32.model.encoder.embed_images.layer2[0]
    block16 = bf16.model.encoder.embed_images.layer2[0]
    for (conv, bn), (w16, b16, _packed) in zip(
        [(block32.conv1, block32.bn1), (block32.conv2, block32.bn2), (block32.conv3, block32.bn3)],
        block16._fused[:3],
        strict=True,
    ):
        w, b = _fold64(conv, bn)
        assert w16.dtype == b16.dtype == torch.bfloat16
        assert torch.equal(w16, w.to(torch.bfloat16))
        assert torch.equal(b16, b.to(torch.bfloat16))
    stem_w, stem_b = _fold64(fp32.model.encoder.embed_images.conv1, fp32.model.encoder.embed_images.bn1)
    assert torch.equal(bf16.model.encoder.embed_images._fused_stem[0], stem_w.to(torch.bfloat16))
    assert torch.equal(bf16.model.encoder.embed_images._fused_stem[1], stem_b.to(torch.bfloat16))


def test_attention_scales_folded_before_the_cast(engines):
    fp32, bf16 = engines
    for attn32, attn16 in [
        (fp32.model.encoder.layers[0].self_attn, bf16.model.encoder.layers[0].self_attn),
        (fp32.model.decoder.layers[1].cross_attn, bf16.model.decoder.layers[1].cross_attn),
    ]:
        wq, bq = attn16._fused["q"].weight, attn16._fused["q"].bias
        assert torch.equal(wq, (attn32.q_proj.weight * attn32.scaling).to(torch.bfloat16))
        assert torch.equal(bq, (attn32.q_proj.bias * attn32.scaling).to(torch.bfloat16))
        head_scale = attn32.c_attn.repeat_interleave(attn32.head_dim)
        wo = attn16._fused["out"].weight
        assert torch.equal(wo, (attn32.out_proj.weight * head_scale).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------- float16 on the CPU
# This CPU runs float16 kernels (slowly: the ResNet's float16 convolutions take torch's generic path), so float16
# is checked here against float32 at a reduced image size, which keeps each test to a few seconds.


@pytest.fixture(scope="module")
def fp16(demo_checkpoint: Path) -> Captioner:
    return Captioner.from_pretrained(demo_checkpoint, dtype="float16")


def _pixels(engine: Captioner, images: list[bytes], size: int) -> torch.Tensor:
    cfg = engine.task_config
    return torch.from_numpy(preprocess_images(images, size=size, mean=cfg.mean, std=cfg.std))


# Measured on the demo checkpoint (best captions of corpus images): equal captions, scores at most 4.6e-4 apart at
# 160 pixels, 3.4e-4 at 192, 2.2e-4 at 256 and 320, 4.2e-4 over the 5-best lists of 6 images at 480. The random
# weights give flat scores (hypotheses ~1e-4 apart): where two nearly tie, float16 may keep the other one (seen at
# 96 pixels), so the test uses inputs without such a tie, and a tolerance twice the largest measured difference.
FP16_SCORE_TOLERANCE = 1e-3


def test_float16_on_the_cpu_equals_float32(engines, fp16, image_corpus):
    fp32, _ = engines
    assert fp16.device.type == "cpu" and fp16.dtype == torch.float16
    assert fp16.model.encoder.layers[0].fc1.weight.dtype == torch.float16
    pixels = _pixels(fp32, [data for _, data in image_corpus[:3]], 160)
    want, got = fp32.generate(pixels), fp16.generate(pixels)
    assert [c.text for c in got] == [c.text for c in want]
    for a, b in zip(want, got, strict=True):
        assert math.isfinite(b.score) and abs(a.score - b.score) <= FP16_SCORE_TOLERANCE, (a, b)


def test_cuda_graphs_are_ignored_off_cuda_with_one_log_line(fp16, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="ofa_captioning.captioner"):
        engine = Captioner(
            fp16.model,
            fp16.tokenizer,
            fp16.task_config,
            device=fp16.device,
            dtype=fp16.dtype,
            cuda_graphs=True,
        )
    assert engine.cuda_graphs is False and fp16.cuda_graphs is False
    records = [r for r in caplog.records if r.name == "ofa_captioning.captioner"]
    assert len(records) == 1 and "cuda_graphs ignored" in records[0].getMessage()
    seen = record_beam_search(monkeypatch)
    (caption,) = engine.generate(torch.zeros(1, 3, 32, 32), beam_size=1, max_length=2)
    assert seen == [False] and caption.text


# ----------------------------------------------------------------------------------- the encoder's fp16 clamp


def _reference_clamp(hidden_states: torch.Tensor) -> torch.Tensor:
    """The last lines of ModelScope's ``OFAEncoderLayer.forward`` (modeling_ofa.py), for one image's batch."""
    if hidden_states.dtype == torch.float16 and (
        torch.isinf(hidden_states).any() or torch.isnan(hidden_states).any()
    ):
        clamp_value = torch.finfo(hidden_states.dtype).max - 1000
        hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
    return hidden_states


def _per_image_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([_reference_clamp(image.unsqueeze(0)) for image in x])


def test_the_clamp_is_the_reference_clamp_per_image():
    x = torch.randn(4, 5, 8).to(torch.float16)
    x[0, 1, 2], x[0, 3, 4] = math.inf, -math.inf  # overflowed: clamped
    x[0, 2, 2] = 65504.0  # finite but above the clamp, in an overflowed image: clamped too
    x[1, 0, 0], x[1, 1, 1] = math.nan, -math.inf  # NaN stays NaN, -inf is clamped
    x[2, 0, 0] = 65504.0  # finite, in an image without inf or NaN: kept (the reference's condition)
    got = clamp_fp16_overflow(x)
    torch.testing.assert_close(got, _per_image_reference(x), rtol=0, atol=0, equal_nan=True)
    limit = torch.tensor(torch.finfo(torch.float16).max - 1000).to(torch.float16)
    assert got[0, 1, 2] == limit and got[0, 3, 4] == -limit and got[0, 2, 2] == limit
    assert got[1, 0, 0].isnan() and got[1, 1, 1] == -limit and got[2, 0, 0] == 65504.0
    assert torch.equal(got[3], x[3])
    for dtype in (torch.float32, torch.bfloat16):  # other dtypes pass through, inf included
        y = x.to(dtype)
        assert clamp_fp16_overflow(y) is y


def test_an_encoder_layer_that_overflows_float16_stays_finite(fp16, monkeypatch):
    """A large activation forced into one layer (its input's channel 0 near the float16 maximum, its feed-forward
    output bias raised): the sum overflows to inf. The layer returns the reference's clamped output instead."""
    layer = fp16.model.encoder.layers[1]
    n, heads = 12, layer.self_attn.num_heads
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, n, layer.fc1.in_features, generator=gen).to(torch.float16)
    x[0, :, 0] = 60000.0
    bias = torch.zeros(1, heads, n, n, dtype=torch.float16)
    saved = layer.fc2.bias.clone()
    try:
        with torch.inference_mode():
            layer.fc2.bias[0] = 30000.0
            clamped = layer(x, bias)
            monkeypatch.setattr(transformer, "clamp_fp16_overflow", lambda h: h)
            unclamped = layer(x, bias)
    finally:
        with torch.inference_mode():
            layer.fc2.bias.copy_(saved)
    assert torch.isinf(unclamped[0]).any() and torch.isfinite(unclamped[1]).all()
    assert torch.isfinite(clamped).all()
    torch.testing.assert_close(clamped, _per_image_reference(unclamped), rtol=0, atol=0)


def test_an_overflowing_encoder_still_captions_in_float16(fp16, image_corpus, monkeypatch):
    """Two encoder layers pushed past the float16 maximum: with the clamp the captions are finite; without it
    the overflow becomes NaN and every caption empty with score -inf (what the clamp is for)."""
    pixels = _pixels(fp16, [data for _, data in image_corpus[:2]], 96)
    layers = fp16.model.encoder.layers[:2]
    saved = [layer.fc2.bias.clone() for layer in layers]
    try:
        with torch.inference_mode():
            for layer in layers:
                layer.fc2.bias[0] = 65000.0
        clamped = fp16.generate(pixels, beam_size=2, max_length=3)
        monkeypatch.setattr(transformer, "clamp_fp16_overflow", lambda h: h)
        unclamped = fp16.generate(pixels, beam_size=2, max_length=3)
    finally:
        with torch.inference_mode():
            for layer, bias in zip(layers, saved, strict=True):
                layer.fc2.bias.copy_(bias)
    assert [c.text for c in unclamped] == ["", ""] and all(c.score == -math.inf for c in unclamped)
    assert all(c.text and math.isfinite(c.score) for c in clamped), clamped


def test_an_overflowing_encoder_matches_modelscopes_in_float16(reference, fp16, image_corpus):
    """The same forced overflow in ModelScope's encoder (a float16 copy) and in the engine's: both clamp, both
    stay finite, and the outputs agree to float16 rounding (measured 1.2e-4; 7.8e-3 without the overflow)."""
    ref_encoder = copy.deepcopy(reference.model.encoder).half().eval()
    pixels = _pixels(fp16, [image_corpus[0][1]], 64).half()
    ids = fp16._prompt_ids.unsqueeze(0)
    layers = fp16.model.encoder.layers[:2]
    saved = [layer.fc2.bias.clone() for layer in layers]
    try:
        with torch.inference_mode():
            for ours, theirs in zip(layers, ref_encoder.layers, strict=False):
                ours.fc2.bias[0] = theirs.fc2.bias[0] = 65000.0
            want = ref_encoder(input_ids=ids, patch_images=pixels, patch_masks=torch.tensor([True]))
            got = fp16.model.encode(ids, pixels)
    finally:
        with torch.inference_mode():
            for layer, bias in zip(layers, saved, strict=True):
                layer.fc2.bias.copy_(bias)
    assert torch.isfinite(want.last_hidden_state).all() and torch.isfinite(got.last_hidden_state).all()
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-2, rtol=0)
