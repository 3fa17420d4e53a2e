"""`PatchGroupNorm`: GroupNorm over a whole image whose rows are spread over the band group.

Each rank normalises its band with the fused local GroupNorm kernel, which also returns the band's
per-(sample, group) mean and inverse std. The bands' (mean, centred sum of squares) are combined with
Chan's parallel formula (accurate in fp32, where `E[x²] - E[x]²` would not be), and one fused
multiply-add turns the locally normalised band into the globally normalised, affine-transformed one.
Fresh steps gather every band's statistics now (blocking); stale steps combine the *other* bands'
statistics of the previous step with this band's fresh ones, and send this step's asynchronously.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from paragen.comms import Slot
from paragen.parallel.patch.context import PatchContext


def combine_band_stats(stats: torch.Tensor, band_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (mean, variance) from per-band `[bands, ..., 2]` (mean, centred sum of squares)."""
    means, m2 = stats[..., 0], stats[..., 1]
    mean = means.mean(dim=0)
    total_m2 = m2.sum(dim=0) + band_size * ((means - mean) ** 2).sum(dim=0)
    return mean, total_m2 / (band_size * stats.shape[0])


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

    def _all_band_stats(self, local: torch.Tensor) -> torch.Tensor:
        ctx = self.patch_ctx
        if ctx.stale:
            stale = self._stale
            previous = stale.wait() if isinstance(stale, Slot) else stale
            everyone = previous.clone()  # type: ignore[union-attr]
            everyone[ctx.comm.rank] = local
            self._stale = ctx.stale_gather.submit(local, ctx.label("norm_stats")) if ctx.publish else None
            return everyone
        everyone = ctx.comm.all_gather(local, ctx.label("norm_stats"))
        self._stale = everyone if ctx.publish else None
        return everyone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()  # the fused kernel needs it (attention passes transposed views)
        batch, channels = x.shape[:2]
        per_group = x[0, 0].numel() * (channels // self.num_groups)
        local, band_mean, band_rstd = torch.native_group_norm(
            x, None, None, batch, channels, x[0, 0].numel(), self.num_groups, self.eps
        )
        band_var = (band_rstd.float().pow(-2) - self.eps).clamp_min(0)
        band_stats = torch.stack([band_mean.float(), band_var * per_group], dim=-1)
        mean, var = combine_band_stats(self._all_band_stats(band_stats), per_group)
        rstd = torch.rsqrt(var + self.eps)
        # local = (x - band_mean)·band_rstd, so (x - mean)·rstd = local·(rstd/band_rstd) + (band_mean - mean)·rstd
        scale = (rstd / band_rstd.float()).repeat_interleave(channels // self.num_groups, dim=1)
        shift = ((band_mean.float() - mean) * rstd).repeat_interleave(channels // self.num_groups, dim=1)
        if self.affine:
            shift = shift * self.weight + self.bias
            scale = scale * self.weight
        view = (batch, channels) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(view).to(x.dtype), local, scale.view(view).to(x.dtype))
