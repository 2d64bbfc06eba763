"""The encoder's attention biases live in storage padded to a multiple of 8 columns (SDPA's CUDA kernels would
otherwise pad them on every call) and are sliced back to N columns: the same values, the same encoder output."""

from __future__ import annotations

import pytest
import torch

from ofa_captioning import transformer
from ofa_captioning.config import ModelConfig
from ofa_captioning.model import OFAModel
from ofa_captioning.transformer import ATTN_BIAS_ALIGNMENT, aligned_empty, padded_length


@pytest.fixture(scope="module")
def model() -> OFAModel:
    config = ModelConfig(
        vocab_size=300,
        d_model=64,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        resnet_type="resnet18",  # the fewest ResNet blocks: a quick initialisation
    )
    torch.manual_seed(0)
    return OFAModel(config).prepare_for_inference()


def _aligned(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and all(s % ATTN_BIAS_ALIGNMENT == 0 for s in t.stride()[:-1])


@pytest.mark.parametrize(("n", "padded"), [(1, 8), (8, 8), (9, 16), (908, 912)])
def test_padded_length(n, padded):
    assert padded_length(n) == padded
    t = aligned_empty((2, 3, n), dtype=torch.float32, device="cpu")
    assert t.shape == (2, 3, n) and _aligned(t)


def test_biases_and_masked_biases_are_aligned_views_with_the_plain_values(model, monkeypatch):
    ids = torch.tensor([[0, 10, 11, 12, 2], [0, 10, 11, 1, 1]])  # the second prompt padded: a mask is added
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    seen: list[torch.Tensor] = []
    layer_forward = transformer.OFAEncoderLayer.forward
    monkeypatch.setattr(
        transformer.OFAEncoderLayer,
        "forward",
        lambda self, x, bias: seen.append(bias) or layer_forward(self, x, bias),
    )
    with torch.inference_mode():
        out = model.encode(ids, images)
        biases = model.encoder.layer_biases(4, 4, 5, torch.device("cpu"), torch.float32)
        n = 4 * 4 + 5
        assert out.has_pads and len(seen) == len(biases) == 2
        for bias, masked in zip(biases, seen, strict=True):
            assert bias.shape == (1, 2, n, n) and masked.shape == (2, 2, n, n)
            assert _aligned(bias) and _aligned(masked)
            mask = torch.zeros(out.padding_mask.shape).masked_fill_(out.padding_mask, torch.finfo().min)
            assert torch.equal(masked, bias + mask[:, None, None, :])
        # The same encoder with plain contiguous storage: equal output, bit for bit.
        monkeypatch.setattr(transformer, "aligned_empty", lambda shape, *, dtype, device: torch.empty(shape))
        model.encoder.clear_cache()
        plain = model.encode(ids, images)
        model.encoder.clear_cache()
    assert not _aligned(seen[-1])  # the stand-in really was plain
    assert torch.equal(plain.last_hidden_state, out.last_hidden_state)
