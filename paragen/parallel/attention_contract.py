"""The part of diffusers' attention-processor contract that every parallel processor shares."""
from __future__ import annotations

from typing import Any

import torch


def heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`[B, L, H·D]` projections as `[B, H, L, D]` (a view)."""
    batch, tokens, inner = x.shape
    return x.view(batch, tokens, heads, inner // heads).transpose(1, 2)


class AttnProcessorContract:
    """diffusers' `AttnProcessor2_0` contract around a parallel key/value source.

    Spatial norm, 4-D inputs, group norm, output projection, residual and output rescale are done here,
    as diffusers does them; a subclass implements `attend` (queries, keys and values from wherever its
    parallel scheme keeps them), returning `[B, H, L, D]`.
    """

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} does not support attention masks")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        out = self.attend(attn, hidden_states, encoder_hidden_states)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[3])
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def attend(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        """Attention output `[B, H, L, D]` for the local queries of `hidden_states`."""
        raise NotImplementedError
