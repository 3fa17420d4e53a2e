"""GroupNorm over a tensor whose elements are spread over ranks (row bands, or clips of frames).

Each rank takes its part's per-(sample, group) mean and centred sum of squares; the parts' statistics
are combined with Chan's parallel formula (accurate in fp32, where `E[x²] - E[x]²` would not be), and one
fused multiply-add per element applies the global normalisation and the affine transform.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def combine_group_stats(stats: torch.Tensor, counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (mean, variance) from per-part `[parts, ..., 2]` (mean, centred sum of squares), where part i
    holds `counts[i]` elements of each group."""
    means, m2 = stats[..., 0], stats[..., 1]
    n = torch.tensor(counts, dtype=means.dtype, device=means.device).view((-1,) + (1,) * (means.dim() - 1))
    total = float(sum(counts))
    mean = (means * n).sum(dim=0) / total
    total_m2 = m2.sum(dim=0) + (n * (means - mean) ** 2).sum(dim=0)
    return mean, total_m2 / total


def corrected_stale_stats(
    previous: torch.Tensor, fresh: torch.Tensor, own: int, counts: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (mean, variance) for a step that has only this part's fresh statistics: every part's `previous`
    statistics (`[parts, ..., 2]`, as for `combine_group_stats`) moved by the change of part `own` since then
    (`fresh`, `[..., 2]`), as DistriFusion's corrected asynchronous GroupNorm does. In raw moments every part's
    E[x] and E[x²] move by this part's Δmean and ΔE[x²]; written as differences, so nothing large cancels:
    mean' = M + Δm, var' = V + Δv_own + 2·Δm·(m_own − M), with (M, V) the previous global statistics. A negative
    variance (the assumption failing) falls back to this part's own."""
    mean, var = combine_group_stats(previous, counts)
    n_own = counts[own]
    old_mean, old_var = previous[own, ..., 0], previous[own, ..., 1] / n_own
    new_mean, new_var = fresh[..., 0], fresh[..., 1] / n_own
    shift = new_mean - old_mean
    corrected = var + (new_var - old_var) + 2 * shift * (old_mean - mean)
    return mean + shift, torch.where(corrected < 0, new_var, corrected)


def part_stats(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, int]:
    """`[batch, groups, 2]` (mean, centred sum of squares) of a part [batch, channels, ...], and its elements
    per (sample, group).

    The moments come from ATen's group-norm kernel (one vectorised pass with a cascaded, cancellation-free
    variance, the kernel `nn.GroupNorm` itself runs; its normalised output is discarded): on one CPU core it
    takes 0.46 ms where `torch.var_mean` takes 6.8 ms for a [2, 64, 64, 128] band. With `eps = 0` it returns
    1/σ, so σ² = rstd⁻² (0 for a constant group, where rstd is inf)."""
    x = x.float().contiguous()  # no copy for a contiguous fp32 band
    batch, channels = x.shape[:2]
    _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, batch, channels, x[0, 0].numel(), num_groups, 0.0)
    count = x[0].numel() // num_groups
    return torch.stack([mean, rstd.pow(-2) * count], dim=-1), count


def normalise_with(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """`norm` applied to `x` [batch, channels, ...] with given per-(sample, group) statistics."""
    batch, channels = x.shape[:2]
    per_channel = channels // norm.num_groups
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(per_channel, dim=1)
    shift = -mean.repeat_interleave(per_channel, dim=1) * scale
    if norm.affine:
        scale = scale * norm.weight
        shift = shift * norm.weight + norm.bias
    view = (batch, channels) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(view).to(x.dtype), x, scale.view(view).to(x.dtype))
