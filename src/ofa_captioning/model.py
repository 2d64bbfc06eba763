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
        """Forget cached position biases, folded BatchNorm weights and captured CUDA graphs (call after changing
        weights)."""
        from .cuda_graphs import forget  # imports this module

        forget(self)
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
        # float16 logits round the vocabulary's scores to ~3 digits before the float32 log-softmax: the output
        # projection runs in float32 there (bfloat16 keeps its own: float32's range, and the CPU's fast path).
        projection = self.decoder.output_projection.weight
        self.decoder.projection = InferenceLinear(
            projection.float() if projection.dtype == torch.float16 else projection
        )
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
        """Per-image cross-attention K/V, the cross-attention bias (positions and padding mask), and the
        self-attention cache of ``beam`` rows per image, allocated once for the whole search.

        ``max_positions`` is the number of decoder positions the search may run (max_len + 1).
        """
        enc = encoder_out.last_hidden_state
        cross_k, cross_v, cross_bias = self._cross_inputs(encoder_out, max_positions)
        heads, hd = self.decoder.num_heads, self.config.d_model // self.decoder.num_heads
        shape = (2, len(self.decoder.layers), enc.shape[0] * beam, heads, max_positions, hd)
        return DecoderState(cross_k, cross_v, cross_bias, enc.new_empty(shape))

    def load_decoder_state(self, state: DecoderState, encoder_out: EncoderOutput) -> None:
        """Write the cross-attention inputs of ``encoder_out`` (as many images, same layout) into ``state``'s own
        tensors, for a search that reuses them (CUDA graphs read fixed addresses); the self-attention cache is
        left as it is (a search writes each position before reading it)."""
        cross_k, cross_v, cross_bias = self._cross_inputs(encoder_out, state.cross_bias.shape[-2])
        for dst, src in zip(state.cross_k + state.cross_v, cross_k + cross_v, strict=True):
            dst.copy_(src)
        if cross_bias.shape != state.cross_bias.shape:
            raise ValueError("encoder output with padding where the state has none (or the reverse)")
        state.cross_bias.copy_(cross_bias)
        state.length = 0

    def _cross_inputs(
        self, encoder_out: EncoderOutput, max_positions: int
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Each decoder layer's cross-attention keys and values [B,H,N,hd] and the cross-attention bias."""
        enc = encoder_out.last_hidden_state
        cross_k, cross_v = [], []
        for layer in self.decoder.layers:
            k, v = layer.cross_attn.keys_values(enc)
            cross_k.append(k.contiguous())
            cross_v.append(v.contiguous())
        mask = None
        if encoder_out.has_pads:
            mask = torch.zeros(encoder_out.padding_mask.shape, dtype=enc.dtype, device=enc.device)
            mask = mask.masked_fill_(encoder_out.padding_mask, torch.finfo(enc.dtype).min)[:, None, None, :]
        cross_bias = self.decoder.cross_bias(encoder_out.position_embedding[0], max_positions, mask)
        return cross_k, cross_v, cross_bias

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """Feed the next token of every row (images x beams, beam-major) and return logits [R,V] (float32 where
        the model is float16: the output projection runs in float32, see :meth:`OFADecoder.project`).

        The row order must match ``state``'s cache (a search reorders it between steps). R may be one row per image
        while the cache holds ``beam`` per image: the first R rows are used (a search's first step).
        """
        return self.decoder.project(self._decode_hidden(tokens[:, None], state))

    def decode_tokens(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """Feed ``T`` new positions per row (tokens [R,T]); returns logits [R,T,V] and advances the cache."""
        rows, t_new = tokens.shape
        return self.decoder.project(self._decode_hidden(tokens, state)).view(rows, t_new, -1)

    def _decode_hidden(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """The decoder layers over ``tokens`` [R,T]: hidden states [R*T,D] (row by row)."""
        rows, t_new = tokens.shape
        start = state.length
        end = start + t_new
        dec = self.decoder
        x = dec.embed(tokens.reshape(-1))
        self_biases = dec.self_biases(state.self_kv.shape[-2], x.device, x.dtype)
        cross_bias = state.cross_bias[:, :, start:end]  # [B or 1,H,T,N]
        beam = rows // state.cross_k[0].shape[0]
        if beam > 1 and t_new > 1:  # stacked beam queries are beam-major: repeat the T rows per beam
            cross_bias = cross_bias.repeat(1, 1, beam, 1)
        for i, layer in enumerate(dec.layers):
            bias = self_biases[i][:, :, start:end, :end]
            x = layer(
                x, t_new, state.layer_cache(i), start, bias, state.cross_k[i], state.cross_v[i], cross_bias
            )
        state.length = end
        return x

    def decoder_logits(self, decoder_input_ids: Tensor, encoder_out: EncoderOutput) -> Tensor:
        """Full (non-incremental) decoder pass, one row per image: ids [B,T] -> logits [B,T,V]."""
        state = self.init_decoder_state(encoder_out, beam=1, max_positions=decoder_input_ids.shape[1])
        return self.decode_tokens(decoder_input_ids, state)
