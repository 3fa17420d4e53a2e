"""Exact causal attention over a prompt cut into contiguous shards, K/V passed around a ring.

Rank i holds queries, keys and values of shard i. Each step it sends the K/V block it holds to rank
i+1 and receives rank i-1's while it computes on the block in hand: first its own (causal), then the
blocks of earlier shards (fully visible) as they arrive. Causality prunes the ring: rank i needs only
the i earlier blocks, so it receives in steps 1…i and forwards in steps 1…i+1 (the last rank forwards
nothing), and no block travels to a rank that would not use it. The partial attentions are merged by
log-sum-exp, so the result equals full causal attention. (The last rank does the most work; a zigzag
split of the sequence would even it out.)
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

    last = rank == size - 1

    def shift(held: torch.Tensor, step: int):
        """Start step `step`'s pass: forward `held` if the next rank needs it, receive if this rank does."""
        return comm.ring_shift_async(held, incoming_shape(step), RING_LABEL, send=step <= rank + 1 and not last,
                                     recv=step <= rank)

    pending = shift(block, 1) if size > 1 else None
    out, lse = causal_attention_with_lse(query, repeat_kv(key, groups), repeat_kv(value, groups), scale)
    for step in range(1, size):
        held = pending.wait()
        if step < size - 1:
            pending = shift(block if held is None else held, step + 1)
        if held is None:  # nothing more arrives here; the ring still counts the step
            continue
        part, part_lse = grouped_query_attention_with_lse(query, held[0], held[1], scale)
        out, lse = merge_attention_states(out, lse, part, part_lse)
    return out
