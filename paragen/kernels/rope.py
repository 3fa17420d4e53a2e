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


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Each pair `(x₂ᵢ, x₂ᵢ₊₁)` → `(-x₂ᵢ₊₁, x₂ᵢ)` along the last dimension (the interleaved layout)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def apply_rope_pairs(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the interleaved layout (Wan): each adjacent pair of `states` rotated by its angle,
    whose cosine and sine are repeated for both members of the pair. Computed in the angles' dtype, returned in
    the states'."""
    return (states * cos + rotate_pairs(states) * sin).type_as(states)
