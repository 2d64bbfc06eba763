"""Derived inference weights on CPU: oneDNN-prepacked linears and convolutions, and when they are dropped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ofa_captioning.captioner import Captioner
from ofa_captioning.kernels import InferenceLinear
from ofa_captioning.model import OFAModel

onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (CPU torch build)")


@onednn
@pytest.mark.parametrize("shape", [(5, 256), (5, 1, 256), (2, 37, 256), (1, 256)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_f_linear_to_float_rounding(shape, bias):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(768, 256, generator=gen)
    b = torch.randn(768, generator=gen) if bias else None
    x = torch.randn(*shape, generator=gen)

    linear = InferenceLinear(weight, b)

    assert linear.packed is not None
    out = linear(x)
    expected = F.linear(x, weight, b)
    assert out.shape == expected.shape
    # Another kernel, another summation order over 256 products of magnitude ~1: agreement to float32 rounding.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_linear_without_onednn_dtype_is_plain_f_linear():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 4, generator=gen).to(torch.float16)
    x = torch.randn(3, 4, generator=gen).to(torch.float16)

    linear = InferenceLinear(weight)

    assert linear.packed is None
    assert torch.equal(linear(x), F.linear(x, weight))
    assert linear.weight is weight and linear.bias is None


@pytest.fixture(scope="module")
def model(demo_checkpoint: Path) -> OFAModel:
    return Captioner.from_pretrained(demo_checkpoint).model


@onednn
def test_prepared_cpu_model_prepacks_its_linears_and_relu_convolutions(model):
    assert model.decoder.projection is not None and model.decoder.projection.packed is not None
    assert model.decoder.projection.weight is model.decoder.output_projection.weight
    for layer in [*model.encoder.layers, *model.decoder.layers]:
        fc1, fc2 = layer.ffn_linears
        assert fc1.weight is layer.fc1.weight and fc2.weight is layer.fc2.weight
        assert fc1.packed is not None and fc2.packed is not None
        assert all(linear.packed is not None for linear in layer.self_attn._fused.values())
    resnet = model.encoder.embed_images
    assert resnet._fused_stem.packed is not None
    for stage in (resnet.layer1, resnet.layer2, resnet.layer3):
        for block in stage:
            conv1, conv2, conv3, *downsample = block._fused
            # Packed where measured faster (ReLU post-op); the residual-add and downsampling ones stay plain.
            assert conv1.packed is not None and conv2.packed is not None
            assert conv3.packed is None
            assert all(ds.packed is None for ds in downsample)


def test_moving_or_reloading_the_model_drops_the_derived_weights(demo_checkpoint):
    model = Captioner.from_pretrained(demo_checkpoint).model
    assert model.decoder.projection is not None

    model.to(torch.float32)  # any _apply (move, cast) invalidates derived weights

    assert model.decoder.projection is None
    assert all(layer.ffn_linears is None for layer in model.decoder.layers)
    assert model.encoder.embed_images._fused_stem is None

    model.prepare_for_inference()
    assert model.decoder.projection is not None
    model.load_state_dict(model.state_dict())
    assert model.decoder.projection is None and model.encoder.layers[0].ffn_linears is None


@pytest.mark.parametrize("chunk", [1, 2])
def test_encoder_in_chunks_of_images_equals_the_whole_batch(model, chunk):
    # Three images (a chunk of 2 leaves one over); image 1's prompt is right-padded and image 2 is masked out
    # (patch_masks False), so each chunk must take its own rows of the padding mask.
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 96, 96, generator=gen)
    ids = torch.tensor([[0, 10, 11, 12, 2], [0, 20, 21, 2, 1], [0, 30, 31, 32, 2]])
    patch_masks = torch.tensor([True, True, False])
    encoder = model.encoder
    saved = encoder.cpu_chunk_size
    try:
        encoder.cpu_chunk_size = 0
        whole = model.encode(ids, images, patch_masks)
        encoder.cpu_chunk_size = chunk
        chunked = model.encode(ids, images, patch_masks)
    finally:
        encoder.cpu_chunk_size = saved

    assert whole.has_pads and chunked.has_pads
    assert torch.equal(whole.padding_mask, chunked.padding_mask)
    torch.testing.assert_close(chunked.last_hidden_state, whole.last_hidden_state, rtol=1e-5, atol=1e-5)
