"""State shared by all patch-parallel layers of one model: the band group, the step plan, the bands."""
from __future__ import annotations

import math

import torch

from paragen.comms import FlatAllGather, GroupComm
from paragen.parallel.steps import StepPlan


class PatchContext(StepPlan):
    """A `StepPlan` over the band group, plus the flat async gather that carries the bands' stale
    data, the full latent size and the partial (PCPP) fraction."""

    def __init__(
        self,
        comm: GroupComm,
        mode: str = "sync",
        warmup_steps: int = 0,
        partial_fraction: float = 1.0,
        label_prefix: str = "",
    ) -> None:
        super().__init__(comm, mode, warmup_steps, label_prefix)
        self.stale_gather = FlatAllGather(comm, label=f"{label_prefix}stale_gather")
        self.partial_fraction = partial_fraction
        self.latent_shape: tuple[int, int] = (0, 0)  # full (rows, cols) of the model's input
        self.whole_input: torch.Tensor | None = None  # the model's whole input, where every rank holds it

    def begin_step(  # type: ignore[override]
        self, latent_rows: int, latent_cols: int, whole_input: torch.Tensor | None = None
    ) -> None:
        """Called before each forward of the model on its band, with the full latent size (and the whole input,
        when every rank holds it: the first conv then reads its halo rows from it)."""
        super().begin_step()
        self.latent_shape = (latent_rows, latent_cols)
        self.whole_input = whole_input

    def end_step(self) -> None:
        """Launch whatever stale data is still queued."""
        self.stale_gather.end_step()

    def end_request(self) -> None:
        """Wait for data in flight, then drop every layer's stale state."""
        self.stale_gather.drain()
        super().end_request()

    @property
    def partial(self) -> bool:
        """Attention sees only the neighbouring bands' nearest rows (PCPP) in stale steps."""
        return self.mode == "partial"

    def band_grid(self, tokens: int) -> tuple[int, int]:
        """(rows, cols) of a band at the resolution where a band has `tokens` tokens."""
        rows, cols = self.latent_shape
        band_rows = rows // self.comm.size
        scale = math.isqrt(band_rows * cols // tokens)
        if scale < 1 or (band_rows // scale) * (cols // scale) != tokens:
            raise RuntimeError(f"cannot place {tokens} tokens on a band of {band_rows}x{cols} latent rows")
        return band_rows // scale, cols // scale
