"""Rotary position embedding applied to `[B, H, L, D]` states (the half-split layout of Llama-family models)."""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x₁, x₂]` → `[-x₂, x₁]` along the last dimension."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `states` by the angles whose cosines and sines are given (broadcast against `states`)."""
    return states * cos + rotate_half(states) * sin
