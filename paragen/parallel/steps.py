"""The step plan shared by all parallel layers of one model: which denoising steps are fresh or stale.

Each step is either *fresh* (every exchange blocking and exact) or *stale* (layers use what the other
ranks sent in the previous step, and publish this step's data asynchronously). A step is stale when
the mode is not `sync`, a request is running, and the warm-up steps are over. A fresh step whose
successor will be stale publishes its data as well, so the first stale step has something to read.
With a step cache, a step it serves publishes nothing (`serving`): the layers that still run in it read what the
last computed step published and keep it, so the next computed step reads it too; and layers called inside
`exact()` (the cache's probe, run before anyone knows whether the step is served) exchange fresh and publish nothing.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from paragen.comms import GroupComm


class StepPlan:
    """The shard group, the mode, and where in the request we are."""

    def __init__(self, comm: GroupComm, mode: str = "sync", warmup_steps: int = 0, label_prefix: str = "") -> None:
        """`comm`: the group whose shards exchange stale data (bands, or token shards)."""
        self.comm = comm
        self.mode = mode
        self.warmup_steps = warmup_steps
        self.label_prefix = label_prefix
        self.step = -1
        self.total_steps: int | None = None
        self.serving = False  # a step cache serves this step: nothing is published
        self._exact = False
        self._resets: list[Callable[[], None]] = []

    # ---- request and step boundaries -----------------------------------------------------------
    def begin_request(self, total_steps: int | None) -> None:
        """Start counting steps; `None` means unknown length (every step is fresh)."""
        self.end_request()
        self.total_steps = total_steps

    def begin_step(self) -> None:
        """Called before each forward of the model on its shard."""
        self.step += 1

    def end_request(self) -> None:
        """Drop every layer's stale state."""
        for reset in self._resets:
            reset()
        self.step = -1
        self.total_steps = None
        self.serving = False

    @contextlib.contextmanager
    def exact(self) -> Iterator[None]:
        """The layers called inside exchange fresh and publish nothing."""
        self._exact = True
        try:
            yield
        finally:
            self._exact = False

    @property
    def first_stale_step(self) -> int | None:
        """The first step that reads stale data (None: none does)."""
        return None if self.mode == "sync" else self.warmup_steps

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
        return not self._exact and self._is_stale(self.step)

    @property
    def publish(self) -> bool:
        """This step must leave data for the next one (the next step is stale, and this one computes)."""
        return not self._exact and not self.serving and self._is_stale(self.step + 1)

    def label(self, name: str) -> str:
        """The accounting label of traffic `name` for this model (e.g. `vae.conv_halo`)."""
        return self.label_prefix + name
