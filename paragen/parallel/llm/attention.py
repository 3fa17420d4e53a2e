"""The attention forward of a Llama-family layer when its cache is a paragen `AttendingCache` (the sharded
cache, or the retrieval and streaming caches speculative decoding drafts over).

Each attention module instance's forward is intercepted (`LlamaAttention`, `Qwen2Attention`,
`MistralAttention`: q/k/v/o projections, RoPE from the model's rotary embedding). With any other
cache — or none — the module's own forward runs unchanged. Heads are read from the projections'
output widths, so the same code serves a module whose weights tensor parallelism has split.
"""
from __future__ import annotations

import torch
from torch import nn

from paragen.kernels.rope import apply_rope
from paragen.parallel.intercept import intercept
from paragen.parallel.llm.cache import AttendingCache, cache_in


def _sharded_forward(
    self: nn.Module, forward, hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    cache = cache_in(kwargs)
    if not isinstance(cache, AttendingCache):
        return forward(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs)
    batch, length, _ = hidden_states.shape
    shape = (batch, length, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    key_pre = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    out = cache.attend(
        self.layer_idx, apply_rope(query, cos, sin), key_pre, apply_rope(key_pre, cos, sin), value, self.scaling
    )
    return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), None


def shard_attention(module: nn.Module) -> None:
    """Route `module`'s forward through a paragen `AttendingCache` when one is passed (in place)."""
    intercept(module, "forward", lambda forward, *args, **kwargs: _sharded_forward(module, forward, *args, **kwargs), tag="llm.attention")
