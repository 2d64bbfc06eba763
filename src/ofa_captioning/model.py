"""The OFA network assembled for inference: :class:`OFAModel` (encoder with its ResNet image embedding, decoder).

Parameter and buffer names are those of ModelScope's ``OFAModel`` so that a published ``pytorch_model.bin`` loads
with ``strict=True``; the parts are :mod:`~ofa_captioning.resnet` (image embedding) and
:mod:`~ofa_captioning.transformer` (attention, encoder, decoder, incremental decoder state), whose maths are
ModelScope's (the parity tests compare the two). :meth:`OFAModel.prepare_for_inference` derives the inference
weights once (BatchNorm folded into the convolutions, fused attention projections, CPU kernels' prepacked
weights from :mod:`~ofa_captioning.kernels`); the incremental decoder (:meth:`OFAModel.init_decoder_state`,
:meth:`OFAModel.decode_step`) is what the beam search drives.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .kernels import InferenceLinear
from .transformer import (
    DecoderState,
    EncoderOutput,
    OFAAttention,
    OFADecoder,
    OFAEncoder,
    OFALayer,
    make_image_bucket_position,
    make_token_bucket_position,
)

__all__ = [
    "DecoderState",
    "EncoderOutput",
    "OFAModel",
    "make_image_bucket_position",
    "make_token_bucket_position",
]


class OFAModel(nn.Module):
    """ModelScope-compatible OFA (state-dict keys identical to ``modelscope...ofa.OFAModel``), inference only."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.check_supported()
        self.config = config
        self._keep_derived = False  # see _apply
        shared = nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id)
        self.encoder = OFAEncoder(config, shared)
        self.decoder = OFADecoder(config, shared)
        if not config.exclude_mlp:
            self.mlp_head = nn.Linear(config.d_model, config.mlp_dim)
        if config.temperature_init_value:
            self.temp = nn.Parameter(config.temperature_init_value * torch.ones([]))
        self.register_load_state_dict_post_hook(lambda module, _keys: module.clear_caches())

    # -- housekeeping --

    def clear_caches(self) -> None:
        """Forget cached position biases and folded BatchNorm weights (call after changing weights)."""
        self.encoder.clear_cache()
        self.decoder.clear_cache()
        self.encoder.embed_images.unfuse_batchnorm()
        for module in self.modules():
            if isinstance(module, OFAAttention):
                module.unfuse()
            elif isinstance(module, OFALayer):
                module.ffn_linears = None

    @torch.no_grad()
    def prepare_for_inference(
        self, fuse_batchnorm: bool = True, dtype: torch.dtype | None = None
    ) -> OFAModel:
        """eval(), no grad, and derived inference weights: BatchNorm folded into the convolutions, fused attention
        projections. Call it after loading, moving or changing the weights (those drop the derived weights).

        With ``dtype`` the model is also cast to it, after the derived weights were computed from the weights
        as they are (float32 as loaded): BatchNorm folds (float64) and attention scales (float32) are rounded to
        float16/bfloat16 once, not applied to already-rounded weights.

        On CPU the convolution and linear weights are also prepacked for oneDNN (see :class:`InferenceLinear`),
        which holds a second copy of them.
        """
        self.eval()
        self.requires_grad_(False)
        self.clear_caches()
        if fuse_batchnorm:
            self.encoder.embed_images.fuse_batchnorm(dtype)
        for module in self.modules():
            if isinstance(module, OFAAttention):
                module.fuse(dtype)
        if dtype is not None:
            self._keep_derived = True
            try:
                self.to(dtype)
            finally:
                self._keep_derived = False
        # Inference views of the plain linear layers, in their final dtype (prepacked for oneDNN on CPU).
        for module in self.modules():
            if isinstance(module, OFALayer):
                module.ffn_linears = (
                    InferenceLinear(module.fc1.weight, module.fc1.bias),
                    InferenceLinear(module.fc2.weight, module.fc2.bias),
                )
        self.decoder.projection = InferenceLinear(self.decoder.output_projection.weight)
        return self

    def _apply(self, fn, recurse=True):
        # Moving or casting the model invalidates every derived tensor (except while prepare_for_inference
        # casts the weights it has just derived from).
        if not self._keep_derived:
            self.clear_caches()
        return super()._apply(fn, recurse)

    # -- encoder --

    def encode(
        self, input_ids: Tensor, patch_images: Tensor, patch_masks: Tensor | None = None
    ) -> EncoderOutput:
        """Run the encoder once per image: ids [B,L], images [B,3,S,S] -> :class:`EncoderOutput`."""
        return self.encoder(input_ids, patch_images, patch_masks)

    # -- decoder --

    def init_decoder_state(self, encoder_out: EncoderOutput, beam: int, max_positions: int) -> DecoderState:
        """Per-image cross-attention K/V, the cross position bias, and empty self-attention caches.

        ``max_positions`` is the number of decoder positions the search may run (max_len + 1).
        """
        enc = encoder_out.last_hidden_state
        bsz = enc.shape[0]
        cross_k, cross_v = [], []
        for layer in self.decoder.layers:
            k, v = layer.cross_attn.keys_values(enc)
            cross_k.append(k.contiguous())
            cross_v.append(v.contiguous())
        cross_pos_bias = self.decoder.cross_position_bias(encoder_out.position_embedding[0], max_positions)
        cross_mask = None
        if encoder_out.has_pads:
            mask = torch.zeros(encoder_out.padding_mask.shape, dtype=enc.dtype, device=enc.device)
            cross_mask = mask.masked_fill_(encoder_out.padding_mask, torch.finfo(enc.dtype).min)[
                :, None, None, :
            ]
        heads, hd = self.decoder.num_heads, self.config.d_model // self.decoder.num_heads
        rows = bsz * beam
        self_kv = enc.new_empty((2 * len(self.decoder.layers), rows, heads, max_positions, hd))
        return DecoderState(cross_k, cross_v, cross_pos_bias, cross_mask, self_kv, beam)

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """Feed the next token of every row (images x beams, beam-major) and return logits [R,V].

        The row order must match ``state`` (use :meth:`DecoderState.reorder` between steps).
        """
        return self.decoder.project(self._decode_hidden(tokens[:, None], state)[:, -1])

    def decode_tokens(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """Feed ``T`` new positions per row (tokens [R,T]); returns logits [R,T,V] and advances the cache."""
        return self.decoder.project(self._decode_hidden(tokens, state))

    def _decode_hidden(self, tokens: Tensor, state: DecoderState) -> Tensor:
        start, t_new = state.length, tokens.shape[1]
        end = start + t_new
        dec = self.decoder
        x = dec.embed(tokens)
        self_biases = dec.self_biases(state.self_kv.shape[3], x.device, x.dtype)
        n_layers = len(dec.layers)
        cross_bias = state.cross_pos_bias[:, start:end]  # [H,T,N]
        beam = tokens.shape[0] // state.cross_k[0].shape[0]
        if beam > 1 and t_new > 1:  # stacked beam queries are beam-major: repeat the T rows per beam
            heads, n_src = cross_bias.shape[0], cross_bias.shape[-1]
            cross_bias = cross_bias.unsqueeze(1).expand(-1, beam, -1, -1).reshape(heads, -1, n_src)
        cross_bias = cross_bias.unsqueeze(0)
        if state.cross_mask is not None:
            cross_bias = cross_bias + state.cross_mask
        for i, layer in enumerate(dec.layers):
            x = layer(
                x,
                state.self_kv[i],
                state.self_kv[n_layers + i],
                start,
                self_biases[i][:, start:end, :end],
                state.cross_k[i],
                state.cross_v[i],
                cross_bias,
            )
        state.length = end
        return x

    def decoder_logits(self, decoder_input_ids: Tensor, encoder_out: EncoderOutput) -> Tensor:
        """Full (non-incremental) decoder pass, one row per image: ids [B,T] -> logits [B,T,V]."""
        state = self.init_decoder_state(encoder_out, beam=1, max_positions=decoder_input_ids.shape[1])
        return self.decode_tokens(decoder_input_ids, state)
