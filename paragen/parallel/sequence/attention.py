"""Attention over a token sequence sharded across ranks: Ulysses, Ring, both, and displaced.

Every rank holds the queries, keys and values of its own contiguous shard (`[B, H, L_i, D]`) and gets
the attention output of those queries over *all* shards' keys:
- **Ulysses** (group of U): one all-to-all turns "my tokens, all heads" into "the group's tokens,
  H/U heads" (q, k and v in one message); attention runs on whole-group sequences; a second
  all-to-all turns the output back. Traffic per layer and rank: 4·(U-1)/U² of the group's S·C.
- **Ring** (group of R): the K/V block of each ring position travels around the ring by P2P; while
  block j is on its way, the rank attends over the block it holds and merges the partial results by
  log-sum-exp. After R-1 hops every query has seen every key. Exact; blocks may differ in length.
- **Ulysses × Ring**: Ulysses inside each group of U consecutive shards, then Ring across the groups.
- **displaced** (stale steps): no exchange on the critical path — the rank's fresh K/V plus the other
  shards' K/V of the previous step, sent point-to-point to every other shard as soon as they exist
  and waited for only where the next step uses them, a whole step later.
Attention is permutation-invariant over keys (no mask; positions are already in q and k through RoPE
or embeddings), so the order in which shards are concatenated does not matter.

`outside`: keys and values from beyond the sequence (a video transformer's other clips, see
`paragen.parallel.clip.keys`), started from the shard's own K/V before the exact attention and merged into
its output by log-sum-exp after it.
"""
from __future__ import annotations

from typing import Callable

import torch

from paragen.comms import GroupComm, Pending
from paragen.kernels import attention_with_lse, dense_attention, merge_attention_states
from paragen.kernels.attention import merge_attention_partials
from paragen.parallel.sequence.context import SequenceContext


# (key, value) of the shard -> a handle on the K/V it also attends to, [B, H/ulysses, L, D] each, or None.
OutsideKeys = Callable[[torch.Tensor, torch.Tensor], "Pending[tuple[torch.Tensor, torch.Tensor]] | None"]



def merge_over_group(comm: GroupComm, out: torch.Tensor, lse: torch.Tensor, label: str,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """The attention of the same queries over every rank's keys, from each rank's partial attention `out` (and its
    log-sum-exp) over its own keys: one all-gather of both (fp32), merged alike on every rank, in `dtype` (default:
    `out`'s). A group of one returns `out` as it is."""
    if comm.size == 1:
        return out
    parts = comm.all_gather(torch.cat([out.float(), lse.unsqueeze(-1)], -1).contiguous(), label)
    return merge_attention_partials(parts[..., :-1], parts[..., -1])[0].to(dtype or out.dtype)


class SequenceAttention:
    """One attention layer's sequence-parallel core (it keeps that layer's stale K/V)."""

    def __init__(self, ctx: SequenceContext, outside: OutsideKeys | None = None) -> None:
        self.ctx = ctx
        self.outside = outside
        self._stale: Pending[list] | None = None
        ctx.on_reset(self.reset)

    def reset(self) -> None:
        """Drop the K/V kept for the next step."""
        self._stale = None

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int],
                 queries: list[int] | None = None) -> torch.Tensor:
        """`[B, H, L, D]` local q/k/v; `lengths[i]`: shard i's keys, `queries[i]` its queries where they are
        fewer or more than its keys (a shard's padding keys left out). Returns the output as `[B, Lq, H, D]`."""
        ctx = self.ctx
        queries = lengths if queries is None else queries
        if key.shape[2] != lengths[ctx.comm.rank] or query.shape[2] != queries[ctx.comm.rank]:
            raise RuntimeError(f"attention got {query.shape[2]} queries and {key.shape[2]} keys, the layout says "
                               f"{queries[ctx.comm.rank]} and {lengths[ctx.comm.rank]}")
        if ctx.stale:
            return self._displaced(query, key, value, lengths)
        if ctx.publish:
            self._publish(key, value, lengths)
        return self._exact(query, key, value, lengths, queries)

    # ---- exact: Ulysses and/or Ring -----------------------------------------------------------------
    def _exact(self, query, key, value, lengths, queries):
        ulysses, ring = self.ctx.ulysses, self.ctx.ring
        outside = self.outside(key, value) if self.outside is not None else None
        members = slice(ring.rank * ulysses.size, (ring.rank + 1) * ulysses.size)
        group, query_group = lengths[members], queries[members]
        if ulysses.size > 1 and query_group == group:
            query, key, value = self._to_heads((query, key, value), group)
        elif ulysses.size > 1:
            (query,) = self._to_heads((query,), query_group)
            key, value = self._to_heads((key, value), group)
        if ring.size > 1:
            blocks = [sum(lengths[r * ulysses.size : (r + 1) * ulysses.size]) for r in range(ring.size)]
            out, lse = self._ring(query, key, value, blocks)
        elif outside is not None:
            out, lse = attention_with_lse(query, key, value)
        else:
            out = dense_attention(query, key, value)
        if outside is not None:
            seen_key, seen_value = outside.wait()
            part, part_lse = attention_with_lse(query, seen_key, seen_value)
            out, lse = merge_attention_states(out.float(), lse, part.float(), part_lse)
        out = out.to(query.dtype)
        if ulysses.size > 1:
            return self._to_tokens(out, query_group)
        return out.transpose(1, 2)

    def _to_heads(self, states: tuple[torch.Tensor, ...], group: list[int]) -> tuple[torch.Tensor, ...]:
        """All-to-all: `[B, H, L_mine, D]` each → `[B, H/U, L_group, D]` each (views of one buffer)."""
        comm = self.ctx.ulysses
        batch, heads, tokens, dim = states[0].shape
        if heads % comm.size:
            raise ValueError(f"Ulysses degree {comm.size} does not divide the {heads} attention heads")
        per_rank, count = heads // comm.size, len(states)
        send = states[0].new_empty(comm.size, tokens, count, batch, per_rank, dim)  # destination-major
        for i, x in enumerate(states):
            send[:, :, i] = x.view(batch, comm.size, per_rank, tokens, dim).permute(1, 3, 0, 2, 4)
        unit = count * batch * per_rank * dim
        recv = comm.all_to_all_flat_async(
            send, [tokens * unit] * comm.size, [n * unit for n in group], self.ctx.label("ulysses_qkv")
        ).wait()
        full = recv.view(sum(group), count, batch, per_rank, dim).permute(1, 2, 3, 0, 4)
        return full.unbind(0)

    def _to_tokens(self, out: torch.Tensor, group: list[int]) -> torch.Tensor:
        """All-to-all back: `[B, H/U, L_group, D]` → `[B, L_mine, H, D]`."""
        comm = self.ctx.ulysses
        batch, per_rank, _, dim = out.shape
        tokens = group[comm.rank]
        send = out.permute(2, 0, 1, 3).contiguous()  # token-major: each rank's tokens are one piece
        unit = batch * per_rank * dim
        recv = comm.all_to_all_flat_async(
            send, [n * unit for n in group], [tokens * unit] * comm.size, self.ctx.label("ulysses_out")
        ).wait()
        return recv.view(comm.size, tokens, batch, per_rank, dim).permute(2, 1, 0, 3, 4).reshape(
            batch, tokens, comm.size * per_rank, dim
        )

    def _ring(self, query, key, value, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of the local queries over every ring position's K/V block, merged by log-sum-exp: the
        output (float) and its log-sum-exp."""
        comm = self.ctx.ring
        held = torch.stack([key, value])  # [2, B, h, L, D]: one message per hop
        out = lse = None
        for hop in range(comm.size):
            pending: Pending | None = None
            if hop < comm.size - 1:  # start the next block's transfer before computing on this one
                incoming = blocks[(comm.rank - hop - 1) % comm.size]
                shape = (*held.shape[:3], incoming, held.shape[4])
                pending = comm.ring_shift_async(held, shape, self.ctx.label("ring_kv"))
            part, part_lse = attention_with_lse(query, held[0], held[1])
            if out is None:
                out, lse = part.float(), part_lse
            else:
                out, lse = merge_attention_states(out, lse, part.float(), part_lse)
            if pending is not None:
                held = pending.wait()
        return out, lse

    # ---- displaced ------------------------------------------------------------------------------
    def _publish(self, key: torch.Tensor, value: torch.Tensor, lengths: list[int]) -> None:
        """Send this shard's K/V to every other shard for the next step's stale attention."""
        batch, heads, _, dim = key.shape
        shapes = [(2, batch, heads, n, dim) for n in lengths]
        self._stale = self.ctx.comm.share_async(torch.stack([key, value]), shapes, self.ctx.label("stale_kv"))

    def _displaced(self, query, key, value, lengths):
        """Fresh own K/V plus every other shard's K/V of the previous step, merged by log-sum-exp."""
        ctx = self.ctx
        if self._stale is None:
            raise RuntimeError("displaced attention has no K/V from the previous step (was the warm-up skipped?)")
        previous = self._stale.wait()  # every other shard's [2, B, H, L_i, D]
        if ctx.publish:  # else kept: a served step's successor reads it again
            self._publish(key, value, lengths)
        out, lse = attention_with_lse(query, key, value)
        out = out.float()
        for kv in previous:
            if kv is not None:
                part, part_lse = attention_with_lse(query, kv[0], kv[1])
                out, lse = merge_attention_states(out, lse, part.float(), part_lse)
        return out.to(query.dtype).transpose(1, 2)
