"""`ClipKeyExchange`: every token shard's keys and values that the other clips see, sent to them point to point.

Called by a video transformer's self-attention as soon as the shard's keys and values exist (after RoPE): it
starts one message to each shard of the other clips (the part of this shard in that clip's seen frames, and
only the heads that shard attends with after its Ulysses all-to-all) and returns a handle; the attention waits
for it after attending within its own clip and merges the two by log-sum-exp. Within a clip nothing is sent.
"""
from __future__ import annotations

import torch

from paragen.comms import GroupComm, Pending
from paragen.parallel.clip.tokens import ClipTokens


class ClipKeyExchange:
    """The seen-frame K/V exchange of one model over the `branch` group (every token shard of a guidance branch)."""

    def __init__(self, branch: GroupComm, ulysses: int, label: str, overlap: bool = True) -> None:
        """`ulysses`: the Ulysses degree inside each clip (its head shards); `overlap`: False waits for the
        exchange before attending within the clip (the blocking comparison)."""
        self.branch, self.ulysses, self.label, self.overlap = branch, ulysses, label, overlap
        self.layout: ClipTokens | None = None
        # per shard of the branch: (this shard's token ranges it receives, relative to this shard's start; the
        # tokens this shard receives from it)
        self._plan: list[tuple[list[tuple[int, int]], int]] = []

    def set_layout(self, layout: ClipTokens) -> None:
        """This request's layout; what goes where is worked out here, once, not in every layer."""
        if layout == self.layout:
            return
        me = self.branch.rank
        offset = layout.bounds(me)[0]
        self.layout = layout
        self._plan = [([], 0) if other == me else
                      ([(low - offset, high - offset) for low, high in layout.pieces(me, other)],
                       layout.seen_tokens(other, me))
                      for other in range(self.branch.size)]

    def start(self, key: torch.Tensor, value: torch.Tensor) -> Pending[tuple[torch.Tensor, torch.Tensor]] | None:
        """Send this shard's `[B, H, L, D]` keys and values where they are seen; the handle gives the K/V this
        shard attends to outside its clip, `[B, H/ulysses, L_seen, D]` each (its heads). None without clips."""
        layout = self.layout
        if layout is None or len(layout.clips.sizes) == 1:
            return None
        batch, heads, _, dim = key.shape
        per_rank = heads // self.ulysses
        kv = torch.stack([key, value])  # [2, B, H, L, D]
        pieces, shapes = [], []
        for other, (ranges, incoming) in enumerate(self._plan):
            head = (other % layout.shards) % self.ulysses * per_rank
            taken = [kv[:, :, head:head + per_rank, low:high] for low, high in ranges]
            pieces.append(torch.cat(taken, dim=3) if taken else kv.new_empty(2, batch, per_rank, 0, dim))
            shapes.append((2, batch, per_rank, incoming, dim))
        handle = self.branch.send_pieces_async(pieces, shapes, self.label)

        def seen() -> tuple[torch.Tensor, torch.Tensor]:
            both = torch.cat([part for part in handle.wait() if part is not None], dim=3)
            return both[0], both[1]

        pending = Pending([], seen)
        if not self.overlap:
            pending.wait()
        return pending
