"""OFA's transformer: relative-position buckets, attention, encoder and decoder layers, the incremental decoder.

The maths follow ModelScope's OFA (``modelscope/models/multi_modal/ofa/modeling_ofa.py``; the parity tests compare
the two): pre-LN transformer layers with NormFormer extras, per-head output scales ``c_attn``, attention scaled by
``(head_dim * attn_scale_factor) ** -0.5``, an absolute position bias shared by all layers and per-layer relative
position biases (1-D for text, 2-D for image patches). Parameter names are ModelScope's.

Organised for inference, with the same results:

* every position-only quantity (the encoder's per-layer attention bias, the decoder's self-attention bias and
  the cross-attention position bias) is computed once and cached on the module, not per image or per step;
* the decoder is incremental (:class:`DecoderState`): a self-attention KV cache, and the cross-attention
  keys/values of each image computed once and shared by all of its beams (queries of the beams are stacked
  against one copy of the image's memory);
* the inference weights (fused q|k|v projections, the feed-forward and output projections) run through
  :class:`~ofa_captioning.kernels.InferenceLinear`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .kernels import InferenceLinear, in_cpu_chunks
from .resnet import ResNet

__all__ = [
    "DecoderState",
    "EncoderOutput",
    "OFAAttention",
    "OFADecoder",
    "OFADecoderLayer",
    "OFAEncoder",
    "OFAEncoderLayer",
    "OFALayer",
    "make_image_bucket_position",
    "make_token_bucket_position",
]

# ModelScope builds the text bucket table for this many positions regardless of max_position_embeddings.
TOKEN_BUCKET_MAX_POSITION = 1024
LN_EPS = 1e-5


def make_token_bucket_position(bucket_size: int, max_position: int = TOKEN_BUCKET_MAX_POSITION) -> Tensor:
    """Text relative-position bucket indices [max_position, max_position] (OFA's log-bucketing beyond ``mid``)."""
    pos = torch.arange(max_position, dtype=torch.float64)
    rel = pos[:, None] - pos[None, :]
    mid = bucket_size // 2
    sign = torch.sign(rel)
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.full_like(rel, mid - 1), rel.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    bucket = torch.where(abs_pos <= mid, rel, log_pos * sign)
    return bucket.long() + bucket_size - 1


def make_image_bucket_position(bucket_size: int, num_relative_distance: int) -> Tensor:
    """Image relative-position bucket indices [bucket_size**2 + 1, same]; index 0 is the reserved position."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(bucket_size), torch.arange(bucket_size), indexing="ij")
    ).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (bucket_size - 1)
    n = bucket_size * bucket_size + 1
    table = torch.zeros((n, n), dtype=torch.long)
    table[1:, 1:] = rel[:, :, 0] * (2 * bucket_size - 1) + rel[:, :, 1]
    table[0, :] = num_relative_distance - 3
    table[:, 0] = num_relative_distance - 2
    table[0, 0] = num_relative_distance - 1
    return table


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


def _activation(name: str):
    """The function of a config.json ``activation_function`` (transformers' ``ACT2FN`` name)."""
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    if name == "tanh":
        return torch.tanh
    raise NotImplementedError(f"activation_function {name!r} is not supported")


# ------------------------------------------------------------------------------------------------ attention


class OFAAttention(nn.Module):
    """Multi-head attention with OFA's scaling and NormFormer's per-head output scales ``c_attn``."""

    def __init__(self, embed_dim: int, num_heads: int, scale_factor: float):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"d_model {embed_dim} is not divisible by {num_heads} heads")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = float(self.head_dim * scale_factor) ** -0.5
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.c_attn = nn.Parameter(torch.ones(num_heads))

        self._fused: dict[str, InferenceLinear] | None = None

    def fuse(self, dtype: torch.dtype | None = None) -> None:
        """Precompute inference weights: q scaling folded into q_proj, one q|k|v projection, c_attn in out_proj.

        The products are taken in float32 and rounded once to ``dtype`` (default: the weights' own).
        """
        dtype = dtype or self.q_proj.weight.dtype
        s = self.scaling
        wq, bq = self.q_proj.weight.float() * s, self.q_proj.bias.float() * s
        wk, bk = self.k_proj.weight.float(), self.k_proj.bias.float()
        wv, bv = self.v_proj.weight.float(), self.v_proj.bias.float()
        head_scale = self.c_attn.float().repeat_interleave(self.head_dim)
        fused = {
            "q": (wq, bq),
            "qkv": (torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv])),
            "kv": (torch.cat([wk, wv]), torch.cat([bk, bv])),
            "out": (self.out_proj.weight.float() * head_scale, self.out_proj.bias.float()),
        }
        self._fused = {
            name: InferenceLinear(w.to(dtype).contiguous(), b.to(dtype).contiguous())
            for name, (w, b) in fused.items()
        }

    def unfuse(self) -> None:
        self._fused = None

    def heads(self, x: Tensor) -> Tensor:
        """[..., T, D] -> [..., H, T, hd]."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def query_rows(self, x: Tensor) -> Tensor:
        """Scaled queries [..., D], heads side by side."""
        if self._fused is not None:
            return self._fused["q"](x)
        return self.q_proj(x) * self.scaling

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values in heads layout."""
        if self._fused is not None:
            k, v = self._fused["kv"](x).chunk(2, dim=-1)
            return self.heads(k), self.heads(v)
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scaled queries, keys and values of self-attention in heads layout."""
        if self._fused is not None:
            q, k, v = self._fused["qkv"](x).chunk(3, dim=-1)
            return self.heads(q), self.heads(k), self.heads(v)
        return (self.heads(self.query_rows(x)), *self.keys_values(x))

    def query_keys_values(self, x: Tensor, t_new: int) -> tuple[Tensor, Tensor]:
        """Self-attention of ``x`` [R*T,D] (``t_new`` positions per row): scaled queries [R,H,T,hd] and the keys and
        values stacked [R,2,H,T,hd] (the decoder cache's layout), from one fused projection where it exists."""
        if self._fused is not None:
            qkv = self._fused["qkv"](x)
        else:
            qkv = torch.cat([self.q_proj(x) * self.scaling, self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv = qkv.view(-1, t_new, 3, self.num_heads, self.head_dim)
        return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1:].permute(0, 2, 3, 1, 4)

    def output(self, attn: Tensor) -> Tensor:
        """[..., H, T, hd] (softmax(.)V) -> per-head scale -> concat -> out_proj: [..., T, D]."""
        return self.project(attn.transpose(-3, -2).flatten(-2))

    def project(self, attn: Tensor) -> Tensor:
        """[..., T, D] (the heads' softmax(.)V side by side) -> per-head scale -> out_proj: [..., T, D]."""
        if self._fused is not None:
            return self._fused["out"](attn)
        scale = self.c_attn.repeat_interleave(self.head_dim).to(attn.dtype)
        return self.out_proj(attn * scale)


# -------------------------------------------------------------------------------------------------- encoder


class OFALayer(nn.Module):
    """What encoder and decoder layers share: the self-attention block's parameters, the feed-forward block,
    NormFormer's extra layer norms and the optional per-channel residual scales (``use_gamma_feature``); with
    ``cross_attention`` also the decoder's cross-attention block. Parameters are created in ModelScope's order
    (the demo checkpoint's seeded initialisation follows it)."""

    def __init__(
        self,
        config: ModelConfig,
        heads: int,
        ffn_dim: int,
        normalize_before: bool,
        cross_attention: bool = False,
    ):
        super().__init__()
        d = config.d_model
        self.self_attn = OFAAttention(d, heads, config.attn_scale_factor)
        self.self_attn_layer_norm = _layer_norm(d)
        self.self_attn_mid_layer_norm = _layer_norm(d) if config.normformer else None
        if cross_attention:
            self.cross_attn = OFAAttention(d, heads, config.attn_scale_factor)
            self.cross_attn_layer_norm = _layer_norm(d)
            self.cross_attn_mid_layer_norm = _layer_norm(d) if config.normformer else None
        self.fc1 = nn.Linear(d, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d)
        self.ffn_layer_norm = _layer_norm(ffn_dim) if config.normformer else None
        self.final_layer_norm = _layer_norm(d)
        self.normalize_before = normalize_before
        self.activation = _activation(config.activation_function)
        self.use_gamma = config.use_gamma_feature
        if self.use_gamma:
            self.weight_self_attn = self._gamma(config)
            if cross_attention:
                self.weight_cross_attn = self._gamma(config)
            self.weight_ffn = self._gamma(config)
        # fc1/fc2 as inference linears: set by OFAModel.prepare_for_inference.
        self.ffn_linears: tuple[InferenceLinear, InferenceLinear] | None = None

    @staticmethod
    def _gamma(config: ModelConfig) -> nn.Parameter:
        return nn.Parameter(torch.ones(config.d_model) * config.gamma)

    def _residual(
        self, x: Tensor, h: Tensor, mid_ln: nn.Module | None, gamma_name: str, ln: nn.Module
    ) -> Tensor:
        """``x + gamma * mid_ln(h)``, then ``ln`` unless the layer normalises before its blocks."""
        if mid_ln is not None:
            h = mid_ln(h)
        if self.use_gamma:
            h = getattr(self, gamma_name) * h
        x = x + h
        return x if self.normalize_before else ln(x)

    def _ffn(self, x: Tensor) -> Tensor:
        h = self.final_layer_norm(x) if self.normalize_before else x
        fc1, fc2 = self.ffn_linears or (self.fc1, self.fc2)
        h = self.activation(fc1(h))
        if self.ffn_layer_norm is not None:
            h = self.ffn_layer_norm(h)
        return self._residual(x, fc2(h), None, "weight_ffn", self.final_layer_norm)


# Attention biases (the encoder's, the decoder's self- and cross-attention ones) are stored with their last dim
# padded to a multiple of this and sliced back: SDPA's CUDA kernels need every stride but the last to be a multiple
# of 8 elements and would otherwise copy a padded bias on every call (N = 908 for 480-pixel images).
ATTN_BIAS_ALIGNMENT = 8


def padded_length(n: int, alignment: int = ATTN_BIAS_ALIGNMENT) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return -(-n // alignment) * alignment


def aligned_empty(shape: tuple[int, ...], *, dtype: torch.dtype, device) -> Tensor:
    """An uninitialised tensor of ``shape`` whose storage pads the last dim to :func:`padded_length`: a view of
    the first ``shape[-1]`` columns, so every stride but the last is a multiple of :data:`ATTN_BIAS_ALIGNMENT`."""
    *lead, n = shape
    return torch.empty(*lead, padded_length(n), dtype=dtype, device=device)[..., :n]


def aligned_copy(t: Tensor) -> Tensor:
    """``t``'s values in :func:`aligned_empty` storage."""
    return aligned_empty(tuple(t.shape), dtype=t.dtype, device=t.device).copy_(t)


def _add_aligned(bias: Tensor, mask: Tensor) -> Tensor:
    """``bias + mask`` (broadcast) written into :func:`aligned_empty` storage, so the sum stays aligned too."""
    shape = torch.broadcast_shapes(bias.shape, mask.shape)
    return torch.add(bias, mask, out=aligned_empty(shape, dtype=bias.dtype, device=bias.device))


def clamp_fp16_overflow(x: Tensor) -> Tensor:
    """ModelScope's float16 guard at the end of each encoder layer (``OFAEncoderLayer.forward`` in
    ``modeling_ofa.py``): where a tensor holds an inf or a NaN, all of it is clamped to +-(float16 max - 1000);
    NaN stays NaN. Other dtypes pass through.

    The condition is decided per image (the reference decides it per batch, which equals per image at batch 1),
    so that an image's caption does not depend on the images batched with it, and on the device
    (``torch.where``), so that it adds no host synchronisation.
    """
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(x.dtype).max - 1000
    overflow = ~torch.isfinite(x).flatten(1).all(dim=1)
    return torch.where(overflow.view(-1, *[1] * (x.dim() - 1)), x.clamp(-limit, limit), x)


class OFAEncoderLayer(OFALayer):
    def __init__(self, config: ModelConfig):
        super().__init__(
            config, config.encoder_attention_heads, config.encoder_ffn_dim, config.encoder_normalize_before
        )

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x [B,N,D]; bias [B or 1,H,N,N] (position bias plus padding mask). In float16 the output goes through
        the reference's overflow clamp (:func:`clamp_fp16_overflow`)."""
        attn = self.self_attn
        h = self.self_attn_layer_norm(x) if self.normalize_before else x
        q, k, v = attn.qkv(h)
        # softmax(q k^T + bias) v with q pre-scaled; the fused kernel (float32 softmax inside, as the reference's)
        # avoids materialising the [B,H,N,N] probabilities.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        x = self._residual(
            x, attn.output(o), self.self_attn_mid_layer_norm, "weight_self_attn", self.self_attn_layer_norm
        )
        return clamp_fp16_overflow(self._ffn(x))


@dataclass
class EncoderOutput:
    """What the decoder needs from the encoder.

    ``last_hidden_state`` [B,N,D] (image patches first, then text), ``padding_mask`` [B,N] bool (True = padded),
    ``position_embedding`` [1,N,D] (the LN'd image+text positions; identical for every image of a batch, so
    stored once), ``has_pads`` whether any position is padded, ``key`` identifies the position layout for caches.
    """

    last_hidden_state: Tensor
    padding_mask: Tensor
    position_embedding: Tensor
    has_pads: bool
    key: tuple

    def select(self, index: Tensor) -> EncoderOutput:
        """The outputs of the images at ``index`` (a new, smaller batch)."""
        return EncoderOutput(
            self.last_hidden_state.index_select(0, index),
            self.padding_mask.index_select(0, index),
            self.position_embedding,
            self.has_pads,
            self.key,
        )


class OFAEncoder(nn.Module):
    def __init__(self, config: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        d = config.d_model
        self.config = config
        self.padding_idx = config.pad_token_id
        self.embed_scale = math.sqrt(d) if config.scale_embedding else 1.0
        self.num_heads = config.encoder_attention_heads
        self.embed_tokens = embed_tokens
        self.type_embedding = nn.Embedding(2, d) if config.add_type_embedding else None
        self.embed_images = ResNet(config.resnet_layers)
        self.image_proj = nn.Linear(1024, d)
        self.patch_layernorm_embedding = _layer_norm(d) if config.patch_layernorm_embedding else None
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, d)
        self.embed_image_positions = nn.Embedding(config.image_bucket_size**2 + 1, d)
        self.pos_ln = _layer_norm(d)
        self.image_pos_ln = _layer_norm(d)
        self.pos_scaling = float(d / self.num_heads * config.attn_scale_factor) ** -0.5
        self.pos_q_linear = nn.Linear(d, d)
        self.pos_k_linear = nn.Linear(d, d)
        self.layers = nn.ModuleList([OFAEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.layer_norm = _layer_norm(d) if config.encoder_normalize_before else None
        n_tables = 1 if config.share_attn_bias else config.encoder_layers
        self.token_rel_pos_table_list = nn.ModuleList(
            [nn.Embedding(2 * config.token_bucket_size - 1, self.num_heads) for _ in range(n_tables)]
        )
        image_num_rel_dis = (2 * config.image_bucket_size - 1) ** 2 + 3
        self.image_rel_pos_table_list = nn.ModuleList(
            [nn.Embedding(image_num_rel_dis, self.num_heads) for _ in range(n_tables)]
        )
        self.register_buffer(
            "image_rp_bucket", make_image_bucket_position(config.image_bucket_size, image_num_rel_dis)
        )
        self.layernorm_embedding = _layer_norm(d) if config.layernorm_embedding else None
        self.register_buffer("token_rp_bucket", make_token_bucket_position(config.token_bucket_size))
        self._bias_cache: dict[tuple, list[Tensor]] = {}
        # Images per pass through the transformer layers on a CPU (0: the whole batch at once).
        self.cpu_chunk_size = 2

    # -- position-only quantities (cached) --

    def image_position_ids(self, h: int, w: int, device) -> Tensor:
        """2-D position ids r*image_bucket_size + c + 1 of an h x w patch grid, row-major."""
        rows = torch.arange(h, device=device)[:, None] * self.config.image_bucket_size
        return (rows + torch.arange(w, device=device)[None, :] + 1).flatten()

    def position_embedding(self, h: int, w: int, text_len: int, device, dtype) -> Tensor:
        """[N,D]: image_pos_ln(image positions) then pos_ln(text positions 0..L-1)."""
        image_pos = self.image_pos_ln(self.embed_image_positions(self.image_position_ids(h, w, device)))
        text_pos = self.pos_ln(self.embed_positions(torch.arange(text_len, device=device)))
        return torch.cat([image_pos, text_pos], dim=0).to(dtype)

    def layer_biases(self, h: int, w: int, text_len: int, device, dtype) -> list[Tensor]:
        """Per-layer self-attention bias [1,H,N,N]: shared absolute bias + text/image relative biases; each a view
        of storage padded to :func:`padded_length` columns (:func:`aligned_empty`)."""
        key = (h, w, text_len, str(device), dtype)
        cached = self._bias_cache.get(key)
        if cached is not None and not torch.is_grad_enabled():
            return cached
        pos = self.position_embedding(h, w, text_len, device, dtype)
        n, p = pos.shape[0], h * w
        pos_q = (self.pos_q_linear(pos) * self.pos_scaling).view(n, self.num_heads, -1).transpose(0, 1)
        pos_k = self.pos_k_linear(pos).view(n, self.num_heads, -1).transpose(0, 1)
        abs_bias = torch.matmul(pos_q, pos_k.transpose(1, 2))  # [H,N,N]
        ids = self.image_position_ids(h, w, device)
        image_bucket = self.image_rp_bucket[ids][:, ids]
        text_bucket = self.token_rp_bucket[:text_len, :text_len]
        biases = []
        for layer_idx in range(len(self.layers)):
            t = 0 if self.config.share_attn_bias else layer_idx
            bias = abs_bias.clone()
            bias[:, p:, p:] += F.embedding(text_bucket, self.token_rel_pos_table_list[t].weight).permute(
                2, 0, 1
            )
            bias[:, :p, :p] += F.embedding(image_bucket, self.image_rel_pos_table_list[t].weight).permute(
                2, 0, 1
            )
            aligned = aligned_empty((1, *bias.shape), dtype=dtype, device=bias.device)
            biases.append(aligned.copy_(bias.unsqueeze(0)))
        if not torch.is_grad_enabled():
            self._bias_cache = {key: biases}  # one layout at a time is all a captioner needs
        return biases

    def clear_cache(self) -> None:
        self._bias_cache = {}

    # -- forward --

    def _layers(self, x: Tensor, biases: list[Tensor], mask: Tensor | None) -> Tensor:
        """The transformer layers over ``x`` [B,N,D]; ``mask`` [B,1,1,N] (additive padding mask) or None."""
        for layer, bias in zip(self.layers, biases, strict=True):
            x = layer(x, bias if mask is None else _add_aligned(bias, mask))
        return x

    def forward(
        self, input_ids: Tensor, patch_images: Tensor, patch_masks: Tensor | None = None
    ) -> EncoderOutput:
        """Encode images [B,3,S,S] and prompt ids [B,L] (right-padded with pad_token_id)."""
        bsz, text_len = input_ids.shape
        image = self.embed_images(patch_images)  # [B,1024,h,w]
        h, w = image.shape[-2:]
        # [B,P,1024] with patch p = r*w + c; a free view for the channels-last ResNet output.
        image = image.permute(0, 2, 3, 1).reshape(bsz, h * w, -1)
        dtype = image.dtype

        image_x = self.image_proj(image) * self.embed_scale
        text_x = self.embed_tokens(input_ids) * self.embed_scale
        if self.type_embedding is not None:
            text_x = text_x + self.type_embedding.weight[0]
            image_x = image_x + self.type_embedding.weight[1]
        if self.patch_layernorm_embedding is not None:
            image_x = self.patch_layernorm_embedding(image_x)
        if self.layernorm_embedding is not None:
            text_x = self.layernorm_embedding(text_x)
        x = torch.cat([image_x, text_x], dim=1)

        image_pad = torch.zeros(bsz, h * w, dtype=torch.bool, device=x.device)
        if patch_masks is not None:
            image_pad[~patch_masks.to(torch.bool)] = True
        padding_mask = torch.cat([image_pad, input_ids.eq(self.padding_idx)], dim=1)
        has_pads = bool(padding_mask.any())

        biases = self.layer_biases(h, w, text_len, x.device, dtype)
        mask = None
        if has_pads:
            x = x * (1 - padding_mask.unsqueeze(-1).to(dtype))
            mask = torch.zeros(padding_mask.shape, dtype=dtype, device=x.device)
            mask.masked_fill_(padding_mask, torch.finfo(dtype).min)
            mask = mask[:, None, None, :]
        # Two images at a time on a CPU (the feed-forward block's [N,4D] stays in cache): 61 vs 74 ms per image
        # at batch 8 in float32 (docs/load-testing.md).
        x = in_cpu_chunks(lambda part, m: self._layers(part, biases, m), self.cpu_chunk_size, x, mask)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        pos = self.position_embedding(h, w, text_len, x.device, dtype).unsqueeze(0)
        return EncoderOutput(x, padding_mask, pos, has_pads, (h, w, text_len))


# -------------------------------------------------------------------------------------------------- decoder


class OFADecoderLayer(OFALayer):
    def __init__(self, config: ModelConfig):
        super().__init__(
            config,
            config.decoder_attention_heads,
            config.decoder_ffn_dim,
            config.decoder_normalize_before,
            cross_attention=True,
        )

    def forward(
        self,
        x: Tensor,
        t_new: int,
        cache: Tensor,
        start: int,
        self_bias: Tensor,
        cross_k: Tensor,
        cross_v: Tensor,
        cross_bias: Tensor,
    ) -> Tensor:
        """One layer over ``T`` new positions of each of R rows (images x beams, beam-major within an image).

        ``x`` [R*T,D] (row by row, the T positions of each); ``cache`` [2,R',H,Tmax,hd] this layer's self-attention
        keys (0) and values (1), R' >= R rows of which the first R are used, written at ``start:start+T``;
        ``self_bias`` [1,H,T,start+T] (positions and causal mask); ``cross_k/cross_v`` [B,H,N,hd] per image;
        ``cross_bias`` [B or 1,H,beam*T,N] for the beams' queries stacked per image. Returns [R*T,D].
        """
        rows = x.shape[0] // t_new
        end = start + t_new
        sa = self.self_attn
        h = self.self_attn_layer_norm(x) if self.normalize_before else x
        q, kv = sa.query_keys_values(h, t_new)
        cache = cache[:, :rows]
        cache[:, :, :, start:end] = kv.transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q, cache[0, :, :, :end], cache[1, :, :, :end], self_bias, scale=1.0
        )
        o = sa.project(o.transpose(1, 2).reshape(x.shape))
        x = self._residual(x, o, self.self_attn_mid_layer_norm, "weight_self_attn", self.self_attn_layer_norm)

        ca = self.cross_attn
        h = self.cross_attn_layer_norm(x) if self.normalize_before else x
        # The queries of an image's beams stacked: [B,H,beam*T,hd] against the image's single K/V (the fused kernel,
        # float32 softmax inside, reads the image's K/V once per query block).
        q = ca.heads(ca.query_rows(h).view(cross_k.shape[0], -1, x.shape[-1]))
        o = F.scaled_dot_product_attention(q, cross_k, cross_v, attn_mask=cross_bias, scale=1.0)
        o = ca.project(o.transpose(1, 2).reshape(x.shape))
        x = self._residual(
            x, o, self.cross_attn_mid_layer_norm, "weight_cross_attn", self.cross_attn_layer_norm
        )
        return self._ffn(x)


@dataclass
class DecoderState:
    """Incremental decoding state of a batch of images x beams (see :meth:`OFAModel.init_decoder_state`).

    Every tensor has a fixed shape for the whole search, so that a decoder step's shapes depend only on (images,
    beam, length): a search reorders the cache's rows (into a second cache of the same shape, see
    :class:`~ofa_captioning.beam_search.BeamSearch`) and never drops any.
    """

    cross_k: list[Tensor]  # per layer [B,H,N,hd]
    cross_v: list[Tensor]
    cross_bias: (
        Tensor  # [B or 1,H,Tmax,N]: position bias of decoder positions 0..Tmax-1, plus the padding mask
    )
    self_kv: Tensor  # [2,layers,R,H,Tmax,hd]: self-attention keys (0) and values (1) of every layer
    length: int = 0  # positions already in the self-attention cache

    def layer_cache(self, layer: int) -> Tensor:
        """Layer ``layer``'s keys and values [2,R,H,Tmax,hd] (a view of ``self_kv``)."""
        return self.self_kv[:, layer]


class OFADecoder(nn.Module):
    def __init__(self, config: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        d = config.d_model
        self.config = config
        self.padding_idx = config.pad_token_id
        self.embed_scale = math.sqrt(d) if config.scale_embedding else 1.0
        self.num_heads = config.decoder_attention_heads
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList([OFADecoderLayer(config) for _ in range(config.decoder_layers)])
        self.layernorm_embedding = _layer_norm(d) if config.layernorm_embedding else None
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, d)
        self.embed_image_positions = nn.Embedding(config.image_bucket_size**2 + 1, d)
        self.pos_ln = _layer_norm(d)
        self.image_pos_ln = _layer_norm(d)
        self.pos_scaling = float(d / self.num_heads * config.attn_scale_factor) ** -0.5
        self.self_pos_q_linear = nn.Linear(d, d)
        self.self_pos_k_linear = nn.Linear(d, d)
        self.cross_pos_q_linear = nn.Linear(d, d)
        self.cross_pos_k_linear = nn.Linear(d, d)
        self.code_layernorm_embedding = _layer_norm(d) if config.code_layernorm_embedding else None
        self.layer_norm = _layer_norm(d) if config.decoder_normalize_before else None
        self.output_projection = nn.Linear(d, config.vocab_size, bias=False)
        if config.share_decoder_input_output_embed:
            self.output_projection.weight = self.embed_tokens.weight
        n_tables = 1 if config.share_attn_bias else config.decoder_layers
        self.token_rel_pos_table_list = nn.ModuleList(
            [nn.Embedding(2 * config.token_bucket_size - 1, self.num_heads) for _ in range(n_tables)]
        )
        # Image-code generation only (unused for captions), kept so that checkpoints load strictly.
        window = config.code_image_size // 8
        rows = torch.arange(window)[:, None] * config.image_bucket_size
        idx = (rows + torch.arange(window)[None, :] + 1).flatten()
        image_position_idx = torch.cat([torch.tensor([0]), idx, torch.full((768,), 1024)])
        self.register_buffer("image_position_idx", image_position_idx)
        image_num_rel_dis = (2 * config.image_bucket_size - 1) ** 2 + 3
        self.image_rel_pos_table_list = nn.ModuleList(
            [nn.Embedding(image_num_rel_dis, self.num_heads) for _ in range(n_tables)]
        )
        self.register_buffer(
            "image_rp_bucket", make_image_bucket_position(config.image_bucket_size, image_num_rel_dis)
        )
        self.register_buffer("token_rp_bucket", make_token_bucket_position(config.token_bucket_size))
        self._self_bias_cache: dict[tuple, list[Tensor]] = {}
        # The output projection as an inference linear: set by OFAModel.prepare_for_inference.
        self.projection: InferenceLinear | None = None

    def clear_cache(self) -> None:
        self._self_bias_cache = {}
        self.projection = None

    def target_positions(self, length: int, device, dtype) -> Tensor:
        """pos_ln(embed_positions[0..length-1]) [length,D]."""
        return self.pos_ln(self.embed_positions(torch.arange(length, device=device))).to(dtype)

    def self_biases(self, length: int, device, dtype) -> list[Tensor]:
        """Per-layer self-attention bias [1,H,T,T] for positions 0..T-1, causal mask included (cached).

        Each is a view of aligned storage (:func:`aligned_empty`), so that SDPA's CUDA kernels take it without
        copying.
        """
        key = (length, str(device), dtype)
        cached = self._self_bias_cache.get(key)
        if cached is not None and not torch.is_grad_enabled():
            return cached
        tp = self.target_positions(length, device, dtype)
        pos_q = (
            (self.self_pos_q_linear(tp) * self.pos_scaling).view(length, self.num_heads, -1).transpose(0, 1)
        )
        pos_k = self.self_pos_k_linear(tp).view(length, self.num_heads, -1).transpose(0, 1)
        abs_bias = torch.matmul(pos_q, pos_k.transpose(1, 2))
        causal = torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)
        bucket = self.token_rp_bucket[:length, :length]
        biases = []
        for layer_idx in range(len(self.layers)):
            t = 0 if self.config.share_attn_bias else layer_idx
            rel = F.embedding(bucket, self.token_rel_pos_table_list[t].weight).permute(2, 0, 1)
            biases.append(aligned_copy((abs_bias + rel).to(dtype) + causal).unsqueeze(0))
        if not torch.is_grad_enabled():
            self._self_bias_cache = {key: biases}
        return biases

    def cross_position_bias(self, src_pos: Tensor, length: int) -> Tensor:
        """Cross-attention position bias [H,T,N] of decoder positions 0..T-1 against encoder positions [N,D]."""
        tp = self.target_positions(length, src_pos.device, src_pos.dtype)
        pos_q = (
            (self.cross_pos_q_linear(tp) * self.pos_scaling).view(length, self.num_heads, -1).transpose(0, 1)
        )
        pos_k = self.cross_pos_k_linear(src_pos).view(src_pos.shape[0], self.num_heads, -1).transpose(0, 1)
        return torch.matmul(pos_q, pos_k.transpose(1, 2))

    def cross_bias(self, src_pos: Tensor, length: int, padding_mask: Tensor | None) -> Tensor:
        """The cross-attention bias of a search [B or 1,H,T,N]: the position bias of decoder positions 0..T-1,
        plus ``padding_mask`` [B,1,1,N] (additive) where given; in aligned storage (:func:`aligned_empty`)."""
        bias = self.cross_position_bias(src_pos, length).unsqueeze(0)
        if padding_mask is not None:
            return _add_aligned(bias, padding_mask)
        return aligned_copy(bias)

    def embed(self, tokens: Tensor) -> Tensor:
        x = self.embed_tokens(tokens) * self.embed_scale
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return x

    def project(self, x: Tensor) -> Tensor:
        """Final LayerNorm and output projection: [..., D] -> logits [..., V] (float32 for a float16 model once
        :meth:`OFAModel.prepare_for_inference` ran)."""
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if self.projection is not None:
            return self.projection(x.to(self.projection.weight.dtype))
        return self.output_projection(x)
