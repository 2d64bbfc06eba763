"""Network parity with ModelScope's OFAModel: encoder output and decoder logits within 1e-4."""

from __future__ import annotations

import pytest
import torch

from ofa_captioning.captioner import Captioner
from ofa_captioning.config import ModelConfig
from ofa_captioning.model import OFAModel

pytestmark = pytest.mark.reference

ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(demo_checkpoint) -> Captioner:
    return Captioner.from_pretrained(demo_checkpoint)


@pytest.fixture(scope="module")
def pixels(reference, image_corpus) -> torch.Tensor:
    # Three varied corpus images, preprocessed by the reference.
    picks = [image_corpus[i][1] for i in (0, 7, 12)]
    return reference.pixels(picks)


@pytest.fixture(scope="module")
def ref_enc(reference, pixels):
    return reference.encoder(pixels)


@pytest.fixture(scope="module")
def enc(engine, pixels):
    return _engine_encode(engine, pixels)


def _engine_encode(engine: Captioner, pixels: torch.Tensor):
    ids = engine._prompt_ids.unsqueeze(0).expand(pixels.shape[0], -1)
    with torch.inference_mode():
        return engine.model.encode(ids, pixels)


@torch.no_grad()
def _ref_decoder_logits(model, enc, prefix: torch.Tensor, rows_per_image: int = 1) -> torch.Tensor:
    """What OFAModel.forward does after its encoder: decoder over the full prefix, no cache."""
    from modelscope.models.multi_modal.ofa.modeling_ofa import _expand_mask

    def rep(t):
        return t.repeat_interleave(rows_per_image, 0)

    return model.decoder(
        input_ids=prefix,
        encoder_hidden_states=rep(enc.last_hidden_state),
        encoder_attention_mask=_expand_mask(rep(enc.padding_mask), torch.float32, prefix.shape[1]),
        src_pos_embed=rep(enc.position_embedding),
    ).last_hidden_state


def test_prompt_tokens_match(engine, reference):
    assert engine._prompt_ids.tolist() == reference.source_tokens()


def test_encoder_output(enc, ref_enc):
    torch.testing.assert_close(enc.last_hidden_state, ref_enc.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        enc.position_embedding.expand_as(ref_enc.position_embedding), ref_enc.position_embedding
    )
    assert torch.equal(enc.padding_mask, ref_enc.padding_mask)
    # The outputs differ per image (what makes scores differ, and preprocessing errors visible).
    assert (enc.last_hidden_state[0] - enc.last_hidden_state[1]).abs().max() > 1e-2


def test_first_step_logits(engine, reference, pixels, enc):
    ref = reference.decoder_logits(pixels[:2])  # [B,1,V]: the whole reference model on bos only
    sub = enc.select(torch.arange(2))
    bos = torch.zeros(2, 1, dtype=torch.long)
    with torch.inference_mode():
        full = engine.model.decoder_logits(bos, sub)
        state = engine.model.init_decoder_state(sub, 1, max_positions=4)
        step = engine.model.decode_step(bos[:, 0], state)
    torch.testing.assert_close(full, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(step, ref[:, 0], atol=ATOL, rtol=0)


def test_prefix_logits_full_and_incremental(engine, reference, pixels, enc, ref_enc):
    """Logits for a 6-token prefix: full pass and KV-cached steps both match the reference's full pass."""
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(4, 50000, (pixels.shape[0], 6), generator=gen)
    prefix[:, 0] = 0
    ref = _ref_decoder_logits(reference.model, ref_enc, prefix)
    with torch.inference_mode():
        full = engine.model.decoder_logits(prefix, enc)
        state = engine.model.init_decoder_state(enc, 1, max_positions=6)
        steps = torch.stack([engine.model.decode_step(prefix[:, t], state) for t in range(6)], dim=1)
    torch.testing.assert_close(full, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(steps, ref, atol=ATOL, rtol=0)


def test_shared_memory_for_beams(engine, reference, pixels, enc, ref_enc):
    """Several beams per image against one copy of its cross-attention K/V equal per-row reference logits."""
    beam = 3
    gen = torch.Generator().manual_seed(4)
    prefix = torch.randint(4, 50000, (pixels.shape[0] * beam, 4), generator=gen)
    prefix[:, 0] = 0
    ref = _ref_decoder_logits(reference.model, ref_enc, prefix, rows_per_image=beam)
    with torch.inference_mode():
        state = engine.model.init_decoder_state(enc, beam, max_positions=4)
        steps = torch.stack([engine.model.decode_step(prefix[:, t], state) for t in range(4)], dim=1)
        # Full (non-incremental) multi-position pass with stacked beams too.
        state = engine.model.init_decoder_state(enc, beam, max_positions=4)
        full = engine.model.decode_tokens(prefix, state)
    assert state.cross_k[0].shape[0] == pixels.shape[0]  # one K/V copy per image, not per beam
    torch.testing.assert_close(steps, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(full, ref, atol=ATOL, rtol=0)


def test_unfused_batchnorm_path(demo_checkpoint, pixels, ref_enc):
    engine = Captioner.from_pretrained(demo_checkpoint)
    engine.model.clear_caches()  # drop the folded BatchNorm: plain eval-mode modules
    assert engine.model.encoder.embed_images._fused_stem is None
    out = _engine_encode(engine, pixels[:1])
    torch.testing.assert_close(out.last_hidden_state, ref_enc.last_hidden_state[:1], atol=ATOL, rtol=0)


def test_padded_inputs(engine, reference, pixels):
    """Padding path: prompts of different lengths (right-padded) and an image whose patches are masked."""
    ids = torch.tensor([[0, 100, 200, 300, 400, 2], [0, 500, 600, 2, 1, 1]])
    masks = torch.tensor([True, False])
    images = pixels[:2]
    with torch.no_grad():
        ref = reference.model.encoder(input_ids=ids, patch_images=images, patch_masks=masks)
    with torch.inference_mode():
        out = engine.model.encode(ids, images, masks)
        prefix = torch.tensor([[0, 7, 8], [0, 9, 10]])
        logits = engine.model.decoder_logits(prefix, out)
    assert torch.equal(out.padding_mask, ref.padding_mask)
    keep = ~ref.padding_mask  # padded rows hold unused values in both
    torch.testing.assert_close(out.last_hidden_state[keep], ref.last_hidden_state[keep], atol=ATOL, rtol=0)
    ref_logits = _ref_decoder_logits(reference.model, ref, prefix)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


# Every switch that changes the architecture, set away from OFA-tiny's values, on a small model.
VARIANT = dict(
    vocab_size=700,
    d_model=96,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=3,
    decoder_attention_heads=2,
    encoder_ffn_dim=160,
    decoder_ffn_dim=224,
    resnet_type="resnet18",
    normformer=False,
    layernorm_embedding=False,
    patch_layernorm_embedding=False,
    code_layernorm_embedding=False,
    share_attn_bias=True,
    use_gamma_feature=True,
    gamma=0.5,
    exclude_mlp=False,
    temperature_init_value=0.7,
    scale_embedding=True,
    attn_scale_factor=1.5,
    token_bucket_size=32,
    image_bucket_size=12,
    max_position_embeddings=64,
    activation_function="relu",
)


def _reference_model(config: dict):
    from load_tests.testkit.reference import install_stand_ins

    install_stand_ins()
    from modelscope.models.multi_modal.ofa import OFAModel as RefOFAModel
    from modelscope.models.multi_modal.ofa.configuration_ofa import OFAConfig

    return RefOFAModel(OFAConfig(**config)).eval()


def test_variant_config_parity(reference):
    """A non-tiny architecture (no NormFormer, shared biases, gamma, post-LN off-switches...) matches too."""
    torch.manual_seed(0)
    ref = _reference_model(VARIANT)
    with torch.no_grad():
        for name, p in ref.named_parameters():  # fresh tables are zero and c_attn one: make every term count
            if (
                "rel_pos_table" in name
                or "c_attn" in name
                or name.endswith(("weight_ffn", "weight_self_attn"))
            ):
                p.normal_(0.5, 0.3)
    model = OFAModel(ModelConfig.from_dict(VARIANT)).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    model.prepare_for_inference()
    images = torch.rand(2, 3, 160, 192) * 2 - 1
    _assert_variant_parity(ref, model, images)


# OFA-Sys size presets (models/ofa/ofa.py) as OFAConfig fields.
SIZES = {
    "medium": dict(d_model=512, encoder_layers=4, decoder_layers=4, encoder_attention_heads=8,
                   decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, resnet_type="resnet101"),
    "base": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, resnet_type="resnet101"),
    "large": dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                  decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, resnet_type="resnet152"),
}  # fmt: skip


@pytest.mark.parametrize("size", sorted(SIZES))
def test_other_sizes_have_reference_keys(size, reference, monkeypatch):
    """Base/large/medium build from their config with exactly the reference's state-dict keys and shapes."""
    linspace = torch.linspace
    # Built on the meta device (no memory, no init cost); ModelScope reads drop-path rates with .item().
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    with torch.device("meta"):
        ref = _reference_model(SIZES[size])
        model = OFAModel(ModelConfig.from_dict(SIZES[size]))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == ref_shapes


# The remaining implemented switches, away from OFA-tiny's values: post-LN layers (no final encoder/decoder
# LayerNorm), no type embedding, an untied output projection, and the config.json aliases of OFAConfig.
VARIANT_POST_LN = dict(
    vocab_size=600,
    hidden_size=64,
    num_attention_heads=4,
    encoder_layers=2,
    decoder_layers=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=96,
    decoder_ffn_dim=80,
    resnet_type="resnet34",
    encoder_normalize_before=False,
    decoder_normalize_before=False,
    add_type_embedding=False,
    share_decoder_input_output_embed=False,
    activation_function="gelu_new",
    token_bucket_size=16,
    image_bucket_size=10,
    max_position_embeddings=32,
)


def test_post_ln_untied_variant_parity(reference):
    """Post-LN, no type embedding, separate output projection, tanh-GELU: same encoder output and logits."""
    torch.manual_seed(1)
    ref = _reference_model(VARIANT_POST_LN)
    assert ref.config.d_model == 64 and ref.encoder.layer_norm is None and ref.encoder.type_embedding is None
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "rel_pos_table" in name or "c_attn" in name or "layer_norm" in name:
                p.normal_(0.5, 0.3)
        ref.decoder.output_projection.weight.normal_(0, 0.5)  # differs from the token embedding
    assert not torch.equal(ref.decoder.output_projection.weight, ref.encoder.embed_tokens.weight)
    model = OFAModel(ModelConfig.from_dict(VARIANT_POST_LN)).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    model.prepare_for_inference()
    images = torch.rand(2, 3, 128, 96) * 2 - 1
    _assert_variant_parity(ref, model, images)


def test_activations_are_transformers_act2fn():
    """Every activation_function the engine accepts computes what ModelScope's layers use (transformers ACT2FN)."""
    from transformers.activations import ACT2FN

    from ofa_captioning.config import ACTIVATIONS
    from ofa_captioning.transformer import _activation

    x = torch.linspace(-6, 6, 2001)
    for name in ACTIVATIONS:
        torch.testing.assert_close(_activation(name)(x), ACT2FN[name](x), atol=1e-6, rtol=0, msg=name)


def _assert_variant_parity(ref, model, images: torch.Tensor) -> None:
    """Encoder output (unpadded positions) and decoder logits of ``model`` equal ModelScope's ``ref`` within
    ATOL, on two fixed prompts (one padded) and decoder prefixes."""
    ids = torch.tensor([[0, 11, 12, 13, 2], [0, 14, 15, 2, 1]])
    prefix = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    with torch.no_grad():
        r = ref.encoder(input_ids=ids, patch_images=images, patch_masks=torch.tensor([True, True]))
    r_logits = _ref_decoder_logits(ref, r, prefix)
    with torch.inference_mode():
        out = model.encode(ids, images)
        logits = model.decoder_logits(prefix, out)
    keep = ~r.padding_mask
    torch.testing.assert_close(out.last_hidden_state[keep], r.last_hidden_state[keep], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, r_logits, atol=ATOL, rtol=0)
