"""`ParallelConfig`: how one request is cut across the ranks, checked against the world size."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from paragen.parallel.clip.config import TemporalAttention
from paragen.parallel.hires.config import HiresConfig

MODES = ("sync", "displaced", "partial")
MODE_HELP = {
    "sync": "every exchange fresh and blocking; equals the single-device output (the reference)",
    "displaced": "DistriFusion: after the warm-up steps, other bands' (or token shards') activations come "
    "from the previous step, gathered asynchronously behind a whole step of compute",
    "partial": "PCPP (UNet models): like displaced, but attention sees only a fraction of the two "
    "neighbouring bands' rows, sent point-to-point (far less traffic, some quality cost)",
}


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel degrees and the exchange mode.

    - `mode`, `warmup_steps`: how layers exchange data (`MODES`); in `displaced` and `partial`, the first
      `warmup_steps` denoising steps of every request run exact (synchronous) and the stale steps start at
      step `warmup_steps` (0-based). DistriFusion counts differently: its `warmup_steps=k` runs k + 1 exact
      steps, so its default 4 is paragen's 5;
    - `cfg`: 1, or 2 to run the classifier-free-guidance branches on different ranks;
    - `patch`: row bands of a UNet's latent (patch parallelism);
    - `ulysses`, `ring`: sequence parallelism of a diffusion transformer's image tokens — all-to-all
      to head shards (Ulysses) and K/V passed around a ring (Ring); `ulysses × ring` shards in all;
    - `hires`: a UNet latent beyond the training size, as overlapping training-size windows spread over
      the ranks (`patch` of them) and steered by a low-resolution view (see `HiresConfig`);
    - `clip`: contiguous clips of a video's frames, one per rank (video pipelines), whose temporal
      attention sees the other clips as `temporal` says (see `TemporalAttention`);
    - `seq`, `tp` (causal LMs): the prompt cut into `seq` contiguous shards whose K/V ring attention
      passes around (they ride the mesh's `ring` dimension), and each shard's weights split over `tp`
      ranks by tensor parallelism; `seq × tp` must equal the world size.

    `patch=-1` means "the ranks left over" once the other degrees are taken. `resolve(world_size)`
    returns a copy with every degree concrete and their product checked against the world size.
    """

    cfg: int = 1
    patch: int = -1
    mode: str = "sync"
    warmup_steps: int = 4
    partial_fraction: float = 0.3
    ulysses: int = 1
    ring: int = 1
    hires: HiresConfig | None = None
    clip: int = 1
    temporal: TemporalAttention = TemporalAttention()
    seq: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg must be 1 or 2 (conditional and unconditional branch), got {self.cfg}")
        if self.patch != -1 and self.patch < 1:
            raise ValueError(f"patch must be a positive number of bands or -1 (the ranks left over), got {self.patch}")
        for name in ("ulysses", "ring", "clip", "seq", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive degree, got {getattr(self, name)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.partial_fraction <= 1.0:
            raise ValueError(f"partial_fraction must be in (0, 1], got {self.partial_fraction}")
        if self.clip > 1 and (self.sequence > 1 or self.patch not in (-1, 1) or self.hires is not None):
            raise ValueError("clip parallelism splits a video's frames; it does not combine with patch, ulysses, ring or hires")
        if (self.seq > 1 or self.tp > 1) and (self.sequence > 1 or self.clip > 1 or self.patch not in (-1, 1)
                                              or self.hires is not None or self.cfg > 1):
            raise ValueError("seq and tp cut a causal LM's prompt and weights; they do not combine with cfg, patch, "
                             "ulysses, ring, clip or hires")
        if self.hires is not None and (self.cfg, self.sequence, self.mode) != (1, 1, "sync"):
            raise ValueError("hires spreads the windows of one image over every rank; it does not combine with "
                             "cfg=2, ulysses, ring or a displaced/partial mode (its own option is guidance=async|sync)")

    @property
    def sequence(self) -> int:
        """Token shards of a diffusion transformer: `ulysses × ring`."""
        return self.ulysses * self.ring

    @property
    def ring_positions(self) -> int:
        """Ranks on one ring: a diffusion transformer's `ring` degree, or a causal LM's `seq` shards."""
        return self.ring * self.seq

    def resolve(self, world_size: int) -> "ParallelConfig":
        """Fill in `patch=-1` and check `cfg × clip × patch × ulysses × ring == world_size`, naming every factor if not."""
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        if self.cfg == 2 and world_size % 2:
            raise ValueError(f"cfg=2 splits the ranks into two branches and needs an even world size; got {world_size}")
        if self.seq > 1 or self.tp > 1:
            if self.seq * self.tp != world_size:
                raise ValueError(f"seq × tp must equal the world size: seq ({self.seq}) × tp ({self.tp}) = "
                                 f"{self.seq * self.tp}, but the world size is {world_size}")
            return dataclasses.replace(self, patch=1)
        taken = self.cfg * self.clip * self.sequence
        patch = self.patch if self.patch != -1 else max(1, world_size // taken)
        if taken * patch != world_size:
            raise ValueError(
                f"parallel degrees do not match the world size: cfg ({self.cfg}) × clip ({self.clip}) × patch ({patch}) × "
                f"ulysses ({self.ulysses}) × ring ({self.ring}) = {taken * patch}, but the world size is {world_size}"
            )
        return dataclasses.replace(self, patch=patch)

    def layout_tag(self) -> str:
        """A file-name fragment naming the layout, e.g. `patch4_cfg2_displaced`, `ulysses2_ring2_cfg1_sync`,
        `hires2_async`, `clip4_dual`."""
        if self.hires is not None:
            return f"hires{self.patch}_{self.hires.guidance}"
        if self.clip > 1:
            return f"clip{self.clip}_{self.temporal.scope}"
        if self.seq > 1 or self.tp > 1:
            return f"seq{self.seq}_tp{self.tp}"
        degrees = [f"patch{self.patch}"] if self.sequence == 1 else []
        degrees += [f"{name}{getattr(self, name)}" for name in ("ulysses", "ring") if getattr(self, name) > 1]
        return "_".join(degrees + [f"cfg{self.cfg}", self.mode])
