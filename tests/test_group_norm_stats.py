"""The corrected stale GroupNorm statistics of displaced mode, against statistics computed from the data."""
from __future__ import annotations

import torch

from paragen.parallel.group_norm import combine_group_stats, corrected_stale_stats, part_stats

GROUPS = 2


def _stats(parts: list[torch.Tensor]) -> torch.Tensor:
    """`[parts, batch, groups, 2]` statistics of row bands `[batch, channels, rows, cols]`."""
    return torch.stack([part_stats(p, GROUPS)[0] for p in parts])


def _exact(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    whole = torch.cat(parts, dim=2).reshape(parts[0].shape[0], GROUPS, -1).double()
    return whole.mean(-1), whole.var(-1, correction=0)


def _counts(parts: list[torch.Tensor]) -> list[int]:
    return [p[0].numel() // GROUPS for p in parts]


def _zero_mean_per_group(d: torch.Tensor) -> torch.Tensor:
    grouped = d.reshape(d.shape[0], GROUPS, -1)
    return (grouped - grouped.mean(-1, keepdim=True)).reshape(d.shape)


def test_exact_when_every_band_moves_its_raw_moments_like_this_one():
    # Bands = one pattern plus a band's own offset; the change is the same zero-mean pattern in every band, so
    # every band's E[x] and E[x²] move by the same amounts: the assumption of the correction holds exactly.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 4, 3, 5, generator=g)
    change = _zero_mean_per_group(torch.randn(2, 4, 3, 5, generator=g))
    before = [base + 1.5 * i for i in range(4)]
    after = [b + change for b in before]
    mean, var = corrected_stale_stats(_stats(before), part_stats(after[2], GROUPS)[0], 2, _counts(before))
    want_mean, want_var = _exact(after)
    assert torch.allclose(mean.double(), want_mean, atol=1e-5) and torch.allclose(var.double(), want_var, atol=1e-4)
    stale = _stats(before)
    stale[2] = part_stats(after[2], GROUPS)[0]
    _, uncorrected_var = combine_group_stats(stale, _counts(before))
    assert (uncorrected_var.double() - want_var).abs().max() > 0.05  # the other bands' stale statistics alone miss it


def test_a_drifting_mean_is_tracked_closer_than_by_stale_statistics():
    g = torch.Generator().manual_seed(1)
    before = [torch.randn(1, 4, 4, 6, generator=g) + 0.3 * i for i in range(3)]
    after = [b * 0.9 + 0.5 + 0.05 * torch.randn(b.shape, generator=g) for b in before]  # a step of the schedule
    previous, fresh = _stats(before), part_stats(after[0], GROUPS)[0]
    mean, _ = corrected_stale_stats(previous, fresh, 0, _counts(before))
    stale = previous.clone()
    stale[0] = fresh
    stale_mean, _ = combine_group_stats(stale, _counts(before))
    want, _ = _exact(after)
    assert (mean.double() - want).abs().max() < (stale_mean.double() - want).abs().max() / 3


def test_a_negative_variance_falls_back_to_the_bands_own():
    previous = torch.tensor([[[0.0, 0.0]], [[10.0, 0.0]]])  # two constant bands of 4 elements: 0 and 10 (M 5, V 25)
    fresh = torch.tensor([[1.0, 4.0]])  # band 1 drops to mean 1 with variance 1: 25 + 1 + 2·(-9)·(10 - 5) < 0
    mean, var = corrected_stale_stats(previous, fresh, 1, [4, 4])
    assert (mean.item(), var.item()) == (-4.0, 1.0)
