"""Linear attention over split tokens: a planned linear-attention module's attention, with one all-reduce.

SANA's self-attention is ReLU-kernel linear attention (`paragen.kernels.linear_attention`), which never reaches
torch's scaled-dot-product attention, so the seam cannot see it. Its keys enter only through a state of
`[B, H, D, D + 1]` summed over them; a `LinearAttentionSite` runs the module's own projections and norms on the
rank's tokens, all-reduces that state over the sequence group (its size does not grow with the image, so Ulysses,
Ring and displaced all come to this one exact all-reduce), and applies the module's output projection. It stands
in for one processor class only (`PROCESSORS`): a module given another processor is refused at install, not
computed some other way.
"""
from __future__ import annotations

import functools

import torch

from paragen.kernels import relu_linear_attention
from paragen.parallel.intercept import intercept
from paragen.parallel.sequence.context import SequenceContext
from paragen.parallel.sequence.seam import TAG  # a linear-attention site is an attention site like the seam's
PROCESSORS = ("SanaLinearAttnProcessor2_0",)  # the processors whose attention is ReLU linear attention, as here


def check_linear(module: torch.nn.Module, name: str) -> None:
    """ValueError when `module`'s processor is not one whose attention is ReLU linear attention (`PROCESSORS`)."""
    processor = type(module.processor).__name__
    if processor not in PROCESSORS:
        raise ValueError(f"{name}: the plan says its attention is ReLU linear attention, but its processor is "
                         f"{processor} (paragen runs {', '.join(PROCESSORS)})")


class LinearAttentionSite:
    """One linear-attention module's attention over every shard's keys."""

    def __init__(self, ctx: SequenceContext, name: str) -> None:
        self.ctx, self.name = ctx, name

    def install(self, module: torch.nn.Module) -> None:
        """Run `module`'s attention here; ValueError when its processor is not ReLU linear attention."""
        check_linear(module, self.name)
        intercept(module, "forward", functools.partial(self._attend, module), tag=TAG)

    def _attend(self, attn, _original, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.name}: sequence-parallel linear attention is self-attention without a mask")
        dtype = hidden_states.dtype
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query, key, value = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (query, key, value))
        label = self.ctx.label("attn.linear_state")
        out = relu_linear_attention(query, key, value, lambda state: self.ctx.comm.all_reduce(state, label))
        out = out.transpose(1, 2).flatten(2).to(dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.clip(-65504, 65504) if dtype == torch.float16 else out
