"""`ClipFramePositions`: the sinusoidal frame-position table (AnimateDiff's motion modules) that
adds each frame's position in the whole video, not in the clip a rank holds (see `ClipContext.frame_positions`)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from paragen.parallel.clip.context import ClipContext


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """`[len(positions), dim]` sin/cos embedding at (possibly fractional) positions, the table's own formula, on
    the positions' device."""
    div_term = torch.exp(torch.arange(0, dim, 2, device=positions.device) * (-math.log(10000.0) / dim))
    angles = positions.unsqueeze(1) * div_term
    table = torch.zeros(len(positions), dim, device=positions.device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


class ClipFramePositions(nn.Module):
    """In-place replacement of the class of diffusers' `SinusoidalPositionalEmbedding` (same `pe` buffer)."""

    clip_ctx: ClipContext
    pe: torch.Tensor

    @classmethod
    def convert(cls, module: nn.Module, ctx: ClipContext) -> "ClipFramePositions":
        """Turn `module` (with a `pe` buffer `[1, positions, dim]`) into a ClipFramePositions in place."""
        module.__class__ = cls
        module.clip_ctx = ctx
        return module  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.clip_ctx.per_request(("frame_positions", id(self)), self._table)
        if x.shape[1] != table.shape[1]:
            raise ValueError(f"frame positions: {x.shape[1]} frames in, the clip holds {table.shape[1]}")
        return x + table.to(x)

    def _table(self) -> torch.Tensor:
        """`[1, clip frames, dim]`: the embedding of this clip's frames."""
        trained = self.pe.shape[1]
        positions = self.clip_ctx.frame_positions(trained, self.pe.device)
        if self.clip_ctx.layout.frames <= trained:
            return self.pe[:, positions.long()]
        return sinusoid(positions, self.pe.shape[2]).unsqueeze(0)
