"""State shared by all patch-parallel layers of one model: the band group and the step plan.

Each step is either *fresh* (every exchange blocking and exact) or *stale* (layers use what the
other bands sent in the previous step, and publish this step's data asynchronously). A step is
stale when the mode is not `sync`, a request is running, and the warm-up steps are over. A fresh
step whose successor will be stale leaves its exchanged data behind as that successor's input, so
the first stale step needs no extra communication.
"""
from __future__ import annotations

import math
from typing import Callable

from paragen.comms import FlatAllGather, GroupComm


class PatchContext:
    """The band group, the mode, and where in the request we are."""

    def __init__(
        self,
        comm: GroupComm,
        mode: str = "sync",
        warmup_steps: int = 0,
        partial_fraction: float = 1.0,
        label_prefix: str = "",
    ) -> None:
        self.comm = comm
        self.mode = mode
        self.warmup_steps = warmup_steps
        self.partial_fraction = partial_fraction
        self.label_prefix = label_prefix
        self.stale_gather = FlatAllGather(comm, label=f"{label_prefix}stale_gather")
        self.step = -1
        self.total_steps: int | None = None
        self.latent_shape: tuple[int, int] = (0, 0)  # full (rows, cols) of the model's input
        self._resets: list[Callable[[], None]] = []

    # ---- request and step boundaries -----------------------------------------------------------
    def begin_request(self, total_steps: int | None) -> None:
        """Start counting steps; `None` means unknown length (every step is fresh)."""
        self.end_request()
        self.total_steps = total_steps

    def begin_step(self, latent_rows: int, latent_cols: int) -> None:
        """Called before each forward of the model on its band, with the full latent size."""
        self.step += 1
        self.latent_shape = (latent_rows, latent_cols)

    def end_step(self) -> None:
        """Launch whatever stale data is still queued."""
        self.stale_gather.end_step()

    def end_request(self) -> None:
        """Wait for data in flight and drop every layer's stale state."""
        self.stale_gather.drain()
        for reset in self._resets:
            reset()
        self.step = -1
        self.total_steps = None

    def on_reset(self, callback: Callable[[], None]) -> None:
        """Register a layer's `reset` to run at the end of each request."""
        self._resets.append(callback)

    # ---- the plan of the current step ------------------------------------------------------------
    def _is_stale(self, step: int) -> bool:
        return (
            self.mode != "sync"
            and self.total_steps is not None
            and self.warmup_steps <= step < self.total_steps
        )

    @property
    def stale(self) -> bool:
        """This step reads the previous step's exchanged data instead of exchanging."""
        return self._is_stale(self.step)

    @property
    def publish(self) -> bool:
        """This step must leave data for the next one (the next step is stale)."""
        return self._is_stale(self.step + 1)

    @property
    def partial(self) -> bool:
        """Attention sees only the neighbouring bands' nearest rows (PCPP) in stale steps."""
        return self.mode == "partial"

    def label(self, name: str) -> str:
        """The accounting label of traffic `name` for this model (e.g. `vae.conv_halo`)."""
        return self.label_prefix + name

    def band_grid(self, tokens: int) -> tuple[int, int]:
        """(rows, cols) of a band at the resolution where a band has `tokens` tokens."""
        rows, cols = self.latent_shape
        band_rows = rows // self.comm.size
        scale = math.isqrt(band_rows * cols // tokens)
        if scale < 1 or (band_rows // scale) * (cols // scale) != tokens:
            raise RuntimeError(f"cannot place {tokens} tokens on a band of {band_rows}x{cols} latent rows")
        return band_rows // scale, cols // scale
