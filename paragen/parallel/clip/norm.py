"""`ClipGroupNorm`: GroupNorm over frames (a 5-D `[B, C, F, H, W]` tensor) whose frames are spread over clips.

Temporal layers normalise over all frames of the video. Each clip's statistics are all-gathered and
combined exactly (`parallel/group_norm.py`), so every clip normalises with the whole video's statistics.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from paragen.parallel.clip.context import ClipContext
from paragen.parallel.group_norm import combine_group_stats, normalise_with, part_stats


class ClipGroupNorm(nn.GroupNorm):
    """In-place subclass of `nn.GroupNorm` (same parameters and state-dict keys) for 5-D inputs."""

    clip_ctx: ClipContext

    @classmethod
    def convert(cls, norm: nn.GroupNorm, ctx: ClipContext) -> "ClipGroupNorm":
        """Turn `norm` into a ClipGroupNorm in place and return it."""
        norm.__class__ = cls
        norm.clip_ctx = ctx
        return norm  # type: ignore[return-value]

    def video_stats(self, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) per (sample, group) over the whole video, from this clip's own frames `own` [B, C, F, H, W]."""
        stats, count = part_stats(own, self.num_groups)
        ctx = self.clip_ctx
        everyone = ctx.comm.all_gather(stats, "clip.norm_stats")
        return combine_group_stats(everyone, ctx.frame_counts(count // own.shape[2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"ClipGroupNorm normalises [B, C, F, H, W] video tensors, got shape {tuple(x.shape)}")
        return normalise_with(self, x, *self.video_stats(x))
