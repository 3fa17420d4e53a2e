"""`ClipContext`: what every clip-parallel layer of one model reads — the group, the layout, the step."""
from __future__ import annotations

from typing import Any, Callable

import torch

from paragen.comms import GroupComm
from paragen.parallel.clip.config import VIDEO_INFINITY_BIAS, TemporalAttention
from paragen.parallel.clip.layout import ClipLayout


class ClipContext:
    """The clip group, the temporal-attention options, this request's layout and this step's timestep."""

    def __init__(self, comm: GroupComm, temporal: TemporalAttention, train_timesteps: int = 1000) -> None:
        self.comm = comm
        self.temporal = temporal
        self.train_timesteps = train_timesteps
        self._layout: ClipLayout | None = None
        self._cache: dict[Any, Any] = {}
        self.timestep: float = float(train_timesteps)

    @property
    def layout(self) -> ClipLayout | None:
        """This request's clips (set once per request, before the first step)."""
        return self._layout

    @layout.setter
    def layout(self, layout: ClipLayout) -> None:
        self._layout = layout
        self._cache = {}

    def per_request(self, key: Any, make: Callable[[], Any]) -> Any:
        """`make()`, computed once per layout: what every layer would otherwise rebuild at every step."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def start(self) -> int:
        """This rank's first frame."""
        return self.layout.bounds(self.comm.rank)[0]

    @property
    def stop(self) -> int:
        """One past this rank's last frame."""
        return self.layout.bounds(self.comm.rank)[1]

    @property
    def size(self) -> int:
        """Frames of this rank's clip."""
        return self.layout.sizes[self.comm.rank]

    def frame_counts(self, per_frame: int) -> list[int]:
        """Elements each clip holds when every frame holds `per_frame`."""
        return [n * per_frame for n in self.layout.sizes]

    def biases(self) -> tuple[float, float]:
        """(local, global) logit biases of dual-scope attention at this step's timestep: the global frames are
        favoured at or above the switch (early, noisy steps: the layout of the story), the local window below."""
        switch = self.temporal.bias_switch * self.train_timesteps / 1000
        bias = VIDEO_INFINITY_BIAS if self.temporal.bias is None else self.temporal.bias
        if self.timestep >= switch:
            return 0.0, bias
        return bias, 0.0

    def frame_positions(self, trained: int, device: torch.device | None = None) -> torch.Tensor:
        """Positions, for a model's learned frame-position table of `trained` entries, of this rank's frames.

        A video that fits the table uses each frame's index in the whole video (exactly what the model does
        on one device). A longer one spreads the table over the video: frame g of F sits at g·(trained-1)/(F-1),
        a fractional position (position interpolation), so neighbouring frames stay in order and close, and the
        frames of the whole video span the range the model was trained on.
        """
        frames = torch.arange(self.start, self.stop, dtype=torch.float32, device=device)
        total = self.layout.frames
        if total <= trained:
            return frames
        return frames * (trained - 1) / (total - 1)
