"""State shared by the sequence-parallel attention layers of one diffusion transformer."""
from __future__ import annotations

from paragen.comms import GroupComm
from paragen.parallel.steps import StepPlan


class SequenceContext(StepPlan):
    """A `StepPlan` over the token shards (`seq` group), the Ulysses and Ring groups.

    Shard `i` of the sequence lives on `seq` rank `i = ring_rank × ulysses + ulysses_rank`; which tokens a shard
    holds is the transformer's sharding plan's and its layout's business (`plan`, `layout`).
    """

    def __init__(
        self, seq: GroupComm, ulysses: GroupComm, ring: GroupComm, mode: str = "sync", warmup_steps: int = 0,
        label_prefix: str = "",
    ) -> None:
        super().__init__(seq, mode, warmup_steps, label_prefix)
        if seq.size != ulysses.size * ring.size:
            raise ValueError(f"seq group of {seq.size} ranks is not ulysses ({ulysses.size}) × ring ({ring.size})")
        self.ulysses = ulysses
        self.ring = ring
