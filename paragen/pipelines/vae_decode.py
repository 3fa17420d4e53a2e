"""Parallel VAE decode: the decoder runs on row bands of the latent over all ranks, exactly.

The decoder's convs, group norms and mid-block attention become patch-parallel (halo rows,
gathered statistics, gathered K/V), its input is cut into one band per rank, and the decoded bands
are all-gathered into the whole image on every rank. Exact, and each rank holds only its band's
activations, which is what lifts the decoder's memory wall at high resolution. A latent whose rows
do not split evenly over the ranks is decoded whole on every rank (`strict=False`) or refused.
"""
from __future__ import annotations

import torch

from paragen.comms import GroupComm
from paragen.log import warn_once
from paragen.parallel.intercept import intercept
from paragen.parallel.partition import band_bounds
from paragen.parallel.patch import PatchContext
from paragen.parallel.patch.convert import patch_modules


BANDED_VAES = ("AutoencoderKL",)  # VAE classes whose decoder runs in bands (2D convs, group norms, attention)


class ParallelVaeDecoder:
    """`vae.decoder`, intercepted to decode in bands over `world`."""

    @staticmethod
    def supports(vae) -> bool:
        """Whether `vae`'s decoder can run in bands (other VAEs decode whole on every rank)."""
        return type(vae).__name__ in BANDED_VAES

    def __init__(self, vae, world: GroupComm) -> None:
        self.world = world
        self.whole = GroupComm(None, world.stats)  # a decode that no rank splits
        self.ctx = PatchContext(world, label_prefix="vae.")
        if world.size > 1:
            patch_modules(vae.decoder, self.ctx)
            intercept(vae.decoder, "forward", self._decode, tag="vae.decode")

    def splits(self, latent_rows: int) -> bool:
        """Whether a latent of `latent_rows` rows is decoded in bands (else whole on every rank)."""
        return latent_rows % self.world.size == 0

    def begin_request(self) -> None:
        self.ctx.begin_request(None)

    def end_request(self) -> None:
        self.ctx.end_request()

    def _decode(self, forward, *args, **kwargs) -> torch.Tensor:
        """The decoder on this rank's band of latent rows; the decoded bands all-gathered."""
        args, kwargs = self._cut(args, kwargs)
        return self._gather(forward(*args, **kwargs))

    def _cut(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Give the decoder this rank's band of latent rows."""
        args, kwargs = list(args), dict(kwargs)
        latents = args[0] if args else kwargs["sample"]
        rows = latents.shape[-2]
        if not self.splits(rows):
            warn_once(f"VAE decode: {rows} latent rows do not split over {self.world.size} ranks; every rank decodes the whole image")
        self.ctx.comm = self.world if self.splits(rows) else self.whole
        start, stop = band_bounds(rows, self.ctx.comm.size, self.ctx.comm.rank)
        if args:
            args[0] = latents[:, :, start:stop]
        else:
            kwargs["sample"] = latents[:, :, start:stop]
        self.ctx.begin_step(*latents.shape[-2:])
        return tuple(args), kwargs

    def _gather(self, output: torch.Tensor) -> torch.Tensor:
        """All-gather the decoded bands into the whole image."""
        comm = self.ctx.comm
        if comm.size == 1:
            return output
        everyone = comm.all_gather(output, "vae.output")
        size, batch, channels, rows, cols = everyone.shape
        return everyone.permute(1, 2, 0, 3, 4).reshape(batch, channels, size * rows, cols)
