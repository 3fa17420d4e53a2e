"""State shared by the sequence-parallel attention layers of one diffusion transformer."""
from __future__ import annotations

from paragen.comms import GroupComm
from paragen.parallel.partition import split_sizes
from paragen.parallel.steps import StepPlan


class SequenceContext(StepPlan):
    """A `StepPlan` over the token shards (`seq` group), the Ulysses and Ring groups, and the sizes.

    Shard `i` of the sequence lives on `seq` rank `i = ring_rank × ulysses + ulysses_rank`. Image tokens
    are always sharded; text tokens are sharded too for joint-attention models (SD3, Flux), whose text
    stream runs through the blocks, and stay whole for cross-attention models (PixArt).
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
        self.image_sizes: list[int] = [0] * seq.size
        self.text_sizes: list[int] = [0] * seq.size

    def set_tokens(self, image: int, text: int = 0) -> None:
        """The full sequence of this step: `image` image tokens and `text` sharded text tokens."""
        if image < self.comm.size:
            raise ValueError(f"{image} image tokens cannot be shared by {self.comm.size} sequence shards")
        self.image_sizes = split_sizes(image, self.comm.size)
        self.text_sizes = split_sizes(text, self.comm.size)

    def lengths(self, text: bool) -> list[int]:
        """Local sequence length of every shard for an attention over image (+ sharded text) tokens."""
        if not text:
            return list(self.image_sizes)
        return [i + t for i, t in zip(self.image_sizes, self.text_sizes)]
