"""`PatchGroupNorm`: GroupNorm over a whole image whose rows are spread over the band group.

The statistics of the bands are combined exactly (`parallel/group_norm.py`). Fresh steps gather every
band's statistics now (blocking); stale steps take every band's statistics of the previous step, moved by
this band's own change since then (DistriFusion's corrected asynchronous GroupNorm: `corrected_stale_stats`),
and send this step's asynchronously.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from paragen.comms import Slot
from paragen.parallel.group_norm import combine_group_stats, corrected_stale_stats, normalise_with, part_stats
from paragen.parallel.patch.context import PatchContext

class PatchGroupNorm(nn.GroupNorm):
    """In-place subclass of `nn.GroupNorm` (same parameters and state-dict keys)."""

    patch_ctx: PatchContext

    @classmethod
    def convert(cls, norm: nn.GroupNorm, ctx: PatchContext) -> "PatchGroupNorm":
        """Turn `norm` into a PatchGroupNorm in place and return it."""
        norm.__class__ = cls
        norm.patch_ctx = ctx
        norm._stale: Slot | torch.Tensor | None = None
        ctx.on_reset(norm.reset)
        return norm  # type: ignore[return-value]

    def reset(self) -> None:
        """Drop the statistics kept for the next step."""
        self._stale = None

    def _global_stats(self, local: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) of the whole image: exact in fresh steps, corrected stale ones otherwise."""
        ctx = self.patch_ctx
        counts = [count] * ctx.comm.size
        if ctx.stale:
            stale = self._stale
            previous = stale.wait() if isinstance(stale, Slot) else stale
            stats = corrected_stale_stats(previous, local, ctx.comm.rank, counts)  # type: ignore[arg-type]
            if ctx.publish:  # else kept: a served step's successor reads it again
                self._stale = ctx.stale_gather.submit(local, ctx.label("norm_stats"))
            return stats
        everyone = ctx.comm.all_gather(local, ctx.label("norm_stats"))
        self._stale = everyone if ctx.publish else None
        return combine_group_stats(everyone, counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats, count = part_stats(x, self.num_groups)
        return normalise_with(self, x, *self._global_stats(stats, count))
