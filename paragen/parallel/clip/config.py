"""`TemporalAttention`: how a clip-parallel video model's temporal self-attention sees the other clips."""
from __future__ import annotations

from dataclasses import dataclass

SCOPES = ("dual", "full")
VIDEO_INFINITY_BIAS = 10.0  # the local/global logit bias of Video-Infinity's temporal attention
SCOPE_HELP = {
    "dual": "Video-Infinity: each frame sees the frames within ±local of it (halo frames from the neighbouring "
    "clips by P2P) and global_frames frames sampled evenly over the whole video (all-gathered)",
    "full": "every frame sees every frame of the video (all-gathered): exact, for short videos and tests",
}


@dataclass(frozen=True)
class TemporalAttention:
    """Options of clip-parallel temporal attention (defaults: Video-Infinity's published ones).

    - `scope`: `dual` (local window + global frames) or `full` (every frame; exact);
    - `local`: the local window's half width p, in frames (a frame sees frames i-p..i+p);
    - `global_frames`: G, frames sampled evenly over the whole video that every frame also sees;
    - `bias`, `bias_switch`: a logit bias that favours the global frames while the timestep is at or
      above `bias_switch` (out of the scheduler's 1000 training timesteps) and the local window below it;
      None: the model family's own (UNet temporal attention: Video-Infinity's 10; a video transformer's 3D
      attention, where the halo and global frames are ordinary keys beside the whole clip: none);
    - `overlap`: start the halo and global exchanges as soon as K and V exist, attend to the own clip
      meanwhile and merge the rest by log-sum-exp (False: exchange, wait, then attend).
    """

    scope: str = "dual"
    local: int = 8
    global_frames: int = 16
    bias: float | None = None
    bias_switch: int = 800
    overlap: bool = True

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"temporal attention scope must be one of {', '.join(SCOPES)}; got {self.scope!r}")
        if self.local < 1:
            raise ValueError(f"the local window half width must be >= 1 frame, got {self.local}")
        if self.global_frames < 1:
            raise ValueError(f"global_frames must be >= 1, got {self.global_frames}")
        if self.bias is not None and not -1e4 < self.bias < 1e4:
            raise ValueError(f"the local/global bias must be a finite logit offset, got {self.bias}")
        if not 0 <= self.bias_switch <= 1000:
            raise ValueError(f"bias_switch is a timestep in [0, 1000], got {self.bias_switch}")

    @property
    def tag(self) -> str:
        """What these options add to a run's file names (after the workload's degrees): the scope."""
        return self.scope
