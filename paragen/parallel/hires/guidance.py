"""The arithmetic of structure guidance: the low-resolution view, its weight over the steps, the mask,
and the mix `ε̃ = ε + w_t · M ⊙ (up(ε_LR) − ε)`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def low_res_size(rows: int, cols: int, window: int, multiple: int) -> tuple[int, int]:
    """The low-resolution latent of a `rows × cols` latent: same aspect, longer side `window`, each side
    a multiple of `multiple` (the UNet's down-sampling) and at least `multiple`."""
    scale = window / max(rows, cols)

    def side(n: int) -> int:
        return max(multiple, multiple * round(n * scale / multiple))

    return side(rows), side(cols)


def _pool_sizes(length: int, out: int, device: torch.device) -> torch.Tensor:
    """Input cells per output cell of adaptive average pooling (PyTorch's floor/ceil bounds), on `device`."""
    i = torch.arange(out, device=device)
    return ((i + 1) * length + out - 1) // out - (i * length) // out


def pooled_noise(noise: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A unit-variance noise of `size` made from `noise` by area pooling: the mean of n independent
    unit normals has variance 1/n, so each pooled cell is scaled by sqrt(n)."""
    pooled = F.adaptive_avg_pool2d(noise.float(), size)
    rows, cols = (_pool_sizes(noise.shape[d], size[i], noise.device) for i, d in enumerate((-2, -1)))
    counts = rows[:, None] * cols[None, :]
    return (pooled * counts.sqrt()).to(noise.dtype)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of `[B, C, h, w]` to `size` (used for the low-resolution prediction and mask)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(x.dtype)


def weight(step: int, first: int, total: int, w0: float, decay: float) -> float:
    """Guidance weight of `step`: w0 at `first` (the first high-resolution step), falling along
    `((1 + cos(π·s))/2) ** decay` with s going from 0 at `first` to 1 one step past the last."""
    if decay == 0:
        return w0
    progress = (step - first) / max(1, total - first)
    return w0 * ((1 + math.cos(math.pi * progress)) / 2) ** decay


def normalise_map(maps: torch.Tensor) -> torch.Tensor:
    """Scale each sample's `[B, h, w]` attention map to [0, 1] (min-max; a flat map becomes 0)."""
    flat = maps.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = (high - low).clamp_min(torch.finfo(maps.dtype).tiny)
    return ((maps - low[:, None, None]) / span[:, None, None]) * (high > low)[:, None, None]


def mix(eps: torch.Tensor, eps_lr: torch.Tensor, mask: torch.Tensor, w: float) -> torch.Tensor:
    """`ε + w · M ⊙ (ε_LR − ε)` (all three already cropped to the same window)."""
    return eps + (w * mask) * (eps_lr - eps)
