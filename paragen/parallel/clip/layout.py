"""Which frames each clip holds, which frames are global, and what the requested length allows."""
from __future__ import annotations

from dataclasses import dataclass

from paragen.parallel.clip.config import TemporalAttention
from paragen.parallel.partition import split_sizes


def global_frame_indices(frames: int, count: int) -> list[int]:
    """`count` frames sampled evenly over `frames` (first and last included); every frame if there are fewer."""
    if count >= frames:
        return list(range(frames))
    if count == 1:
        return [0]
    return sorted({round(i * (frames - 1) / (count - 1)) for i in range(count)})


@dataclass(frozen=True)
class ClipLayout:
    """The frames of one video over the clip group."""

    frames: int
    sizes: tuple[int, ...]
    global_frames: tuple[int, ...]

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(sum(self.sizes[:i]) for i in range(len(self.sizes)))

    def bounds(self, clip: int) -> tuple[int, int]:
        """Frames `[start, stop)` of clip `clip`."""
        start = self.starts[clip]
        return start, start + self.sizes[clip]

    def global_in(self, clip: int) -> list[int]:
        """The global frames clip `clip` holds, as indices into its own frames."""
        start, stop = self.bounds(clip)
        return [g - start for g in self.global_frames if start <= g < stop]


def plan_clips(frames: int, clips: int, temporal: TemporalAttention, conv_halo: int) -> ClipLayout:
    """The layout of `frames` over `clips` ranks; ValueError (the same on every rank) if it cannot work.

    A clip must hold at least the frames its neighbours reach into: `conv_halo` for the stacked temporal
    convolutions, and the local window `temporal.local` for dual-scope attention.
    """
    if frames <= 0:
        raise ValueError(f"num_frames must be positive, got {frames}")
    if clips > frames:
        raise ValueError(f"more ranks than frames: {clips} clips for {frames} frames")
    sizes = split_sizes(frames, clips)  # as even as possible, the longer clips first
    need = max(conv_halo, temporal.local if temporal.scope == "dual" else 0) if clips > 1 else 0
    if min(sizes) < need:
        what = [f"the temporal convolutions' stacked halo of {conv_halo}"] if conv_halo else []
        if temporal.scope == "dual":
            what.append(f"the local attention window of ±{temporal.local}")
        raise ValueError(
            f"clips shorter than the halo: {frames} frames over {clips} ranks gives clips of {min(sizes)} frames, "
            f"but a clip must hold {need} frames ({' and '.join(what)}); use at least {need * clips} frames or fewer ranks"
        )
    return ClipLayout(frames, tuple(sizes), tuple(global_frame_indices(frames, temporal.global_frames)))
