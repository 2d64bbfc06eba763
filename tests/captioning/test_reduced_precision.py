"""Reduced precision: derived inference weights are computed from the float32 weights and rounded once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ofa_captioning.captioner import Captioner


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
