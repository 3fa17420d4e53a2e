"""`HiresConfig`: the options of the high-resolution mode (ASGDiffusion-style structure guidance)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

GUIDANCE_MODES = ("async", "sync")
PLACEMENTS = ("interleaved", "dedicated")


@dataclass(frozen=True)
class HiresConfig:
    """How a latent larger than the model's training size is denoised.

    - `window`, `stride`: training-size windows (latent pixels) that cover the latent, overlapping;
      `None`: the UNet's `sample_size` and half of the window.
    - `guidance`: `async` mixes in the low-resolution prediction of the previous step (never waits for
      it); `sync` waits for this step's (the exact reference of the same algorithm).
    - `guidance_weight` (w0, in [0, 1]) and `guidance_decay` (exponent >= 0 of a cosine decay from w0 at
      the first high-resolution step to 0 after the last; 0 keeps w0 constant).
    - `map_layers`: module-name prefixes of the UNet whose cross-attention maps form the guidance mask.
    - `structure_fraction`: share of the steps run on the low-resolution latent alone before its
      predicted clean latent, upsampled and re-noised, seeds the high-resolution latent (0: no seeding).
    - `placement`: the low-resolution branch is one more unit of work on a rank that also denoises
      windows (`interleaved`) or has a rank to itself (`dedicated`).
    - `window_batch`: windows per UNet call on a rank.
    """

    PROBE_REFUSAL: ClassVar[str] = "hires ranks denoise different windows (one also the low-resolution view)"


    window: int | None = None
    stride: int | None = None
    guidance: str = "async"
    guidance_weight: float = 0.5
    guidance_decay: float = 1.0
    map_layers: tuple[str, ...] = ("up_blocks",)
    structure_fraction: float = 0.2
    placement: str = "interleaved"
    window_batch: int = 1

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"hires window must be a positive number of latent pixels, got {self.window}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"hires stride must be a positive number of latent pixels, got {self.stride}")
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ValueError(f"hires stride ({self.stride}) is larger than the window ({self.window}): "
                             "the windows would leave gaps")
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"hires guidance must be one of {', '.join(GUIDANCE_MODES)}; got {self.guidance!r}")
        if not 0.0 <= self.guidance_weight <= 1.0:
            raise ValueError(f"guidance weight must be in [0, 1] (it interpolates towards the low-resolution "
                             f"prediction), got {self.guidance_weight}")
        if not 0.0 <= self.guidance_decay <= 16.0:
            raise ValueError(f"guidance decay must be an exponent in [0, 16], got {self.guidance_decay}")
        if not self.map_layers or not all(isinstance(p, str) and p for p in self.map_layers):
            raise ValueError(f"map_layers must name at least one UNet module prefix, got {self.map_layers!r}")
        if not 0.0 <= self.structure_fraction < 1.0:
            raise ValueError(f"structure_fraction must be in [0, 1), got {self.structure_fraction}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"hires placement must be one of {', '.join(PLACEMENTS)}; got {self.placement!r}")
        if self.window_batch < 1:
            raise ValueError(f"window_batch must be >= 1, got {self.window_batch}")

    @property
    def tag(self) -> str:
        """What these options add to a run's file names (after the workload's degrees): the guidance mode."""
        return self.guidance
