"""Attention processors that route diffusers' DiT attention through `SequenceAttention`.

Each one does what the diffusers processor it replaces does (projections, q/k norms, RoPE, output
projections) on the rank's own tokens, and calls the sequence-parallel core where diffusers calls
scaled-dot-product attention. Which tokens a layer sees:
- `AttnProcessor2_0` self-attention (PixArt `attn1`, SD3.5's second image attention): image tokens.
- `JointAttnProcessor2_0` (SD3): the rank's image tokens followed by its shard of the text tokens.
- `FluxAttnProcessor` (Flux): the rank's text shard followed by its image tokens, either as two
  streams (double blocks) or already concatenated (single blocks); RoPE comes pre-sliced for them.
- `WanAttnProcessor` self-attention (Wan `attn1`): the rank's video tokens; RoPE comes pre-sliced.
Cross-attention to the text (PixArt and Wan `attn2`) needs nothing from other ranks and keeps its processor.
"""
from __future__ import annotations

import torch

from paragen.kernels.rope import apply_rope_pairs
from paragen.parallel.attention_contract import AttnProcessorContract, heads_first
from paragen.parallel.sequence.attention import OutsideKeys, SequenceAttention
from paragen.parallel.sequence.context import SequenceContext

# diffusers processor class -> the paragen processor that replaces it on a self/joint attention.
SELF_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
JOINT_PROCESSORS = ("JointAttnProcessor2_0",)
FLUX_PROCESSORS = ("FluxAttnProcessor", "FluxAttnProcessor2_0")
WAN_PROCESSORS = ("WanAttnProcessor", "WanAttnProcessor2_0")
# Cross-attention processors left in place: their keys are the (whole, replicated) text.
CROSS_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


def _project(attn, states: torch.Tensor, to_q, to_k, to_v, norm_q, norm_k) -> tuple[torch.Tensor, ...]:
    """q, k, v of `states` as `[B, H, L, D]`, with the optional q/k norms (diffusers' order)."""
    query, key, value = (heads_first(proj(states), attn.heads) for proj in (to_q, to_k, to_v))
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


class SeqSelfAttnProcessor(AttnProcessorContract):
    """Self-attention over the image tokens of every shard."""

    def __init__(self, ctx: SequenceContext) -> None:
        super().__init__(ctx)
        self.core = SequenceAttention(ctx)

    def attend(self, attn, hidden_states, encoder_hidden_states):
        if encoder_hidden_states is not None:
            raise ValueError("a self-attention layer was given encoder states (only_cross_attention is not supported)")
        query, key, value = _project(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        return self.core(query, key, value, self.ctx.lengths(text=False)).transpose(1, 2)


class SeqJointAttnProcessor:
    """SD3's joint attention: `[image shard, text shard]` against every shard's image and text tokens."""

    def __init__(self, ctx: SequenceContext) -> None:
        self.ctx = ctx
        self.core = SequenceAttention(ctx)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("sequence-parallel joint attention does not support attention masks")
        image_tokens = hidden_states.shape[1]
        query, key, value = _project(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        text = encoder_hidden_states is not None
        if text:
            text_query, text_key, text_value = _project(
                attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                attn.norm_added_q, attn.norm_added_k,
            )
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)
        out = self.core(query, key, value, self.ctx.lengths(text=text)).flatten(2, 3).to(query.dtype)
        out, text_out = out[:, :image_tokens], out[:, image_tokens:]
        out = attn.to_out[1](attn.to_out[0](out))
        if not text:
            return out
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return out, text_out


class SeqFluxAttnProcessor:
    """Flux attention: `[text shard, image shard]` against every shard's text and image tokens."""

    def __init__(self, ctx: SequenceContext) -> None:
        self.ctx = ctx
        self.core = SequenceAttention(ctx)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError("sequence-parallel Flux attention does not support attention masks")
        query, key, value, text_query, text_key, text_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        two_streams = encoder_hidden_states is not None
        if two_streams:
            text_query = attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim)))
            text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
            text_value = text_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        heads_first_view = (t.transpose(1, 2) for t in (query, key, value))
        out = self.core(*heads_first_view, self.ctx.lengths(text=True)).flatten(2, 3).to(query.dtype)
        if not two_streams:
            return out
        text_tokens = encoder_hidden_states.shape[1]
        text_out, out = out[:, :text_tokens], out[:, text_tokens:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(text_out.contiguous())


class SeqWanAttnProcessor:
    """Wan's self-attention: the rank's video tokens (q/k RMS-normed over all heads, RoPE in the interleaved
    layout) against every shard's keys (with clips: every shard of the clip, and the `outside` K/V it sees of
    the other clips)."""

    def __init__(self, ctx: SequenceContext, outside: OutsideKeys | None = None) -> None:
        self.ctx = ctx
        self.core = SequenceAttention(ctx, outside)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("sequence-parallel Wan self-attention takes neither encoder states nor a mask")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [B, L, H, D]
        if rotary_emb is not None:
            cos, sin = rotary_emb  # [1, L, 1, D], this rank's tokens
            query, key = apply_rope_pairs(query, cos, sin), apply_rope_pairs(key, cos, sin)
        out = self.core(*(t.transpose(1, 2) for t in (query, key, value)), self.ctx.lengths(text=False))
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
