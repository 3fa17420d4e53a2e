"""`ClipTemporalAttnProcessor`: temporal self-attention over a video whose frames are spread over clips.

Queries are this clip's frames (`[pixels, frames, channels]`, one sequence per pixel). Keys and values:

- `full` scope: every frame of the video. Every clip sends its K/V to every other (P2P); meanwhile the
  clip attends to its own frames, and the other clips' part is merged in by log-sum-exp. Exact.
- `dual` scope (Video-Infinity): the local window — frames within ±p of the query, where the clip's
  edge frames need the neighbouring clips' last/first p frames (P2P halo) — plus G global frames sampled
  evenly over the video (each clip sends the ones it holds to all). A frame that is both local and global
  is seen twice, once in each scope. The local and global scores get the biases of `ClipContext.biases`.
  Parts: own clip (band-masked), halo (band-masked), global; merged by log-sum-exp.

With `overlap`, the exchanges start as soon as K and V exist and the own-clip part is computed while they
travel; without it, both exchanges are waited for first. The same parts are computed in the same order
either way, so the two give identical outputs.
"""
from __future__ import annotations

import torch

from paragen.comms import Pending
from paragen.kernels.attention import attention_with_lse, masked_attention_with_lse, merge_attention_states
from paragen.parallel.attention_contract import AttnProcessorContract, heads_first
from paragen.parallel.clip.context import ClipContext


def window_mask(query_frames: torch.Tensor, key_frames: torch.Tensor, reach: int) -> torch.Tensor:
    """Additive `[Lq, Lk]` mask: 0 where the key frame is within `reach` frames of the query frame, else -inf."""
    near = (query_frames[:, None] - key_frames[None, :]).abs() <= reach
    return torch.zeros(near.shape, device=near.device).masked_fill_(~near, float("-inf"))


def _dual_masks(ctx: ClipContext, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The local-window masks of this clip's queries over its own frames and over the halo frames it
    receives (the neighbours' last / first p frames, for the neighbours it has, in that order), on `device`."""
    reach, rank = ctx.temporal.local, ctx.comm.rank
    frames = torch.arange(ctx.start, ctx.stop, device=device)
    halo = [torch.arange(first, first + reach, device=device) for first, present in
            ((ctx.start - reach, rank > 0), (ctx.stop, rank < ctx.comm.size - 1)) if present]
    halo_frames = torch.cat(halo) if halo else frames[:0]
    return window_mask(frames, frames, reach), window_mask(frames, halo_frames, reach)


class ClipTemporalAttnProcessor(AttnProcessorContract):
    """Processor for the temporal self-attention modules of a clip-parallel video UNet."""

    ctx: ClipContext

    def attend(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("clip-parallel temporal attention is self-attention over frames; got encoder states")
        query = heads_first(attn.to_q(hidden_states), attn.heads)
        key = heads_first(attn.to_k(hidden_states), attn.heads)
        value = heads_first(attn.to_v(hidden_states), attn.heads)
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        kv = torch.stack([key, value])  # [2, pixels, heads, frames, head_dim]
        if self.ctx.temporal.scope == "full":
            return self._full(query, kv, attn.scale)
        return self._dual(query, kv, attn.scale)

    def _shapes(self, kv: torch.Tensor, frames: list[int]) -> list[tuple[int, ...]]:
        return [tuple(kv.shape[:3]) + (n, kv.shape[4]) for n in frames]

    def _full(self, query: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        ctx = self.ctx
        others = ctx.comm.share_async(kv, self._shapes(kv, list(ctx.layout.sizes)), "clip.full_kv")
        if not ctx.temporal.overlap:
            others.wait()
        out, lse = attention_with_lse(query, kv[0], kv[1], scale)
        remote = [part for part in others.wait() if part is not None]
        if remote:
            rest = torch.cat(remote, dim=3)
            out, lse = merge_attention_states(out, lse, *attention_with_lse(query, rest[0], rest[1], scale))
        return out

    def _dual(self, query: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        ctx = self.ctx
        reach, layout, rank = ctx.temporal.local, ctx.layout, ctx.comm.rank
        size = kv.shape[3]
        halo: Pending = ctx.comm.exchange_neighbours_async(kv[:, :, :, :reach], kv[:, :, :, size - reach :], "clip.halo_kv")
        held = ctx.per_request("global_held", lambda: [layout.global_in(i) for i in range(ctx.comm.size)])
        mine = held[rank]
        shared = ctx.comm.share_async(kv[:, :, :, mine], self._shapes(kv, [len(h) for h in held]), "clip.global_kv")
        if not ctx.temporal.overlap:
            halo.wait()
            shared.wait()
        local_bias, global_bias = ctx.biases()
        own_mask, halo_mask = ctx.per_request("dual_masks", lambda: _dual_masks(ctx, query.device))
        out, lse = masked_attention_with_lse(query, kv[0], kv[1], own_mask, scale)
        edges = [part for part in halo.wait() if part is not None]
        if edges:
            near = torch.cat(edges, dim=3)
            out, lse = merge_attention_states(out, lse, *masked_attention_with_lse(query, near[0], near[1], halo_mask, scale))
        received = shared.wait()
        received[rank] = kv[:, :, :, mine]
        glob = torch.cat(received, dim=3)  # in frame order: clips are contiguous
        g_out, g_lse = attention_with_lse(query, glob[0], glob[1], scale)
        out, _ = merge_attention_states(out, lse + local_bias, g_out, g_lse + global_bias)
        return out
