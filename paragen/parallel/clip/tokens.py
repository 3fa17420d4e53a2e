"""`ClipTokens`: a video transformer's tokens over clips and sequence shards, and what each clip sees of the others.

The latent frames are cut into clips (`ClipLayout`); clip c's tokens (its frames × the tokens of one frame,
frame-major as the transformer flattens them) are cut into `shards` contiguous sequence shards. Shard `i` of
clip `c` is token shard `c × shards + i` of the whole video, so the shards are in the video's token order.

A clip's 3D attention sees its own clip whole (through the sequence shards' Ulysses/Ring) and, outside it,
the frames `seen_frames` names: with `dual` scope the `halo` edge frames of each neighbouring clip and the
global frames of the layout, each frame once (a global frame inside the halo is not counted twice); with
`full` scope every other frame (exact).
"""
from __future__ import annotations

from dataclasses import dataclass

from paragen.parallel.clip.layout import ClipLayout
from paragen.parallel.partition import split_sizes


@dataclass(frozen=True)
class ClipTokens:
    """The token shards of one video over clips × sequence shards."""

    clips: ClipLayout
    per_frame: int  # tokens of one latent frame
    shards: int  # sequence shards per clip
    scope: str  # "dual" or "full"
    halo: int  # dual: edge frames seen from each neighbouring clip

    @property
    def sizes(self) -> list[int]:
        """Tokens of every shard, in video order."""
        return [n for clip in range(len(self.clips.sizes)) for n in self.clip_sizes(clip)]

    def clip_sizes(self, clip: int) -> list[int]:
        """Tokens of each sequence shard of clip `clip`."""
        return split_sizes(self.clips.sizes[clip] * self.per_frame, self.shards)

    def bounds(self, shard: int) -> tuple[int, int]:
        """`[start, stop)` of token shard `shard` in the whole video's tokens."""
        sizes = self.sizes
        start = sum(sizes[:shard])
        return start, start + sizes[shard]

    def seen_frames(self, clip: int) -> list[int]:
        """The frames outside clip `clip` that its tokens attend to, in order."""
        start, stop = self.clips.bounds(clip)
        if self.scope == "full":
            return [f for f in range(self.clips.frames) if not start <= f < stop]
        halo = set(range(max(0, start - self.halo), start)) | set(range(stop, min(self.clips.frames, stop + self.halo)))
        return sorted(halo | {g for g in self.clips.global_frames if not start <= g < stop})

    def pieces(self, source: int, destination: int) -> list[tuple[int, int]]:
        """Token ranges (of the whole video) of shard `source` that shard `destination`'s clip sees outside
        itself; consecutive frames make one range."""
        start, stop = self.bounds(source)
        ranges: list[tuple[int, int]] = []
        for frame in self.seen_frames(destination // self.shards):
            low, high = max(start, frame * self.per_frame), min(stop, (frame + 1) * self.per_frame)
            if low >= high:
                continue
            if ranges and ranges[-1][1] == low:
                ranges[-1] = (ranges[-1][0], high)
            else:
                ranges.append((low, high))
        return ranges

    def seen_tokens(self, source: int, destination: int) -> int:
        """How many of shard `source`'s tokens shard `destination` receives."""
        return sum(high - low for low, high in self.pieces(source, destination))
