"""Exact causal attention over a prompt cut into contiguous shards, K/V passed around a ring.

Rank i holds queries, keys and values of shard i. Each step it sends the K/V block it holds to rank
i+1 and receives rank i-1's while it computes on the block in hand: first its own (causal), then the
blocks of earlier shards (fully visible) as they arrive; blocks of later shards are only passed on.
The partial attentions are merged by log-sum-exp, so the result equals full causal attention.
"""
from __future__ import annotations

import torch

from paragen.comms import GroupComm
from paragen.kernels.attention import (
    causal_attention_with_lse,
    grouped_query_attention_with_lse,
    merge_attention_states,
    repeat_kv,
)

RING_LABEL = "llm_ring_kv"


def ring_causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, comm: GroupComm, shard_lengths: list[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention of this shard's `query [B, Hq, L, D]` over every earlier shard and its own `key`,
    `value [B, Hkv, L, D]` (post-RoPE keys); `shard_lengths[i]` is shard i's token count."""
    rank, size = comm.rank, comm.size
    block = torch.stack([key, value])
    groups = query.shape[1] // key.shape[1]

    def incoming_shape(step: int) -> tuple[int, ...]:
        return (*block.shape[:-2], shard_lengths[(rank - step) % size], block.shape[-1])

    pending = comm.ring_shift_async(block, incoming_shape(1), RING_LABEL) if size > 1 else None
    out, lse = causal_attention_with_lse(query, repeat_kv(key, groups), repeat_kv(value, groups), scale)
    for step in range(1, size):
        held = pending.wait()
        pending = comm.ring_shift_async(held, incoming_shape(step + 1), RING_LABEL) if step < size - 1 else None
        if (rank - step) % size < rank:  # an earlier shard: every key is visible
            part, part_lse = grouped_query_attention_with_lse(query, held[0], held[1], scale)
            out, lse = merge_attention_states(out, lse, part, part_lse)
    return out
