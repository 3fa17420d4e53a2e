"""Where the windows of a high-resolution latent lie, and which rank denoises which."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Offsets of windows of `window` covering `length`, evenly spread, at most `stride` apart.

    The first window starts at 0 and the last ends at `length`; the gaps are the same up to one pixel.
    """
    if length < window:
        raise ValueError(f"a latent side of {length} is smaller than the window ({window})")
    count = math.ceil((length - window) / stride) + 1
    if count == 1:
        return [0]
    return [round(i * (length - window) / (count - 1)) for i in range(count)]


@dataclass(frozen=True)
class Window:
    """A square window of the latent: rows `top:top+size`, columns `left:left+size`."""

    top: int
    left: int
    size: int

    def crop(self, latent: torch.Tensor) -> torch.Tensor:
        """This window of a `[..., rows, cols]` tensor (a view)."""
        return latent[..., self.top : self.top + self.size, self.left : self.left + self.size]


def window_grid(rows: int, cols: int, window: int, stride: int) -> list[Window]:
    """Row-major windows covering a `rows × cols` latent."""
    return [Window(top, left, window) for top in window_starts(rows, window, stride)
            for left in window_starts(cols, window, stride)]


def coverage(rows: int, cols: int, windows: list[Window], device: torch.device | None = None) -> torch.Tensor:
    """How many windows cover each latent pixel (`[rows, cols]` on `device`, every entry >= 1)."""
    count = torch.zeros(rows, cols, device=device)
    for w in windows:
        w.crop(count).add_(1)
    return count


@dataclass(frozen=True)
class Assignment:
    """Which rank runs the low-resolution branch and which windows each rank denoises."""

    lr_rank: int
    windows: tuple[tuple[int, ...], ...]  # per rank, indices into the window grid

    def load(self, rank: int) -> int:
        """Units of work of `rank` per step (a window or the low-resolution pass is one unit each)."""
        return len(self.windows[rank]) + (rank == self.lr_rank)


def assign(windows: int, ranks: int, placement: str) -> Assignment:
    """Spread `windows` over `ranks`, balanced in units of one UNet pass; the last rank runs the
    low-resolution branch (with windows of its own when `interleaved`, alone when `dedicated`)."""
    lr_rank = ranks - 1
    dedicated = placement == "dedicated" and ranks > 1
    if windows < ranks - 1:  # either way every rank but the low-resolution one needs a window
        what = f"{windows} windows" + ("" if dedicated else " + the low-resolution pass")
        raise ValueError(f"{ranks} ranks but only {what}: some ranks would have no work; use fewer ranks, "
                         "a smaller stride or a larger image")
    workers = ranks - 1 if dedicated else ranks
    loads = [0] * ranks
    if not dedicated:
        loads[lr_rank] = 1
    owned: list[list[int]] = [[] for _ in range(ranks)]
    for index in range(windows):
        rank = min(range(workers), key=lambda r: (loads[r], r))
        owned[rank].append(index)
        loads[rank] += 1
    return Assignment(lr_rank, tuple(tuple(w) for w in owned))
