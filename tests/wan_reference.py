"""A single-process reference of dual-scope clips for Wan's 3D self-attention, written apart from paragen.

`install_wan_reference(pipe, frames, clips, local, count)` wraps the stock `WanAttnProcessor` of every
self-attention (`attn1`) of a stock `WanPipeline` so that it runs with a boolean mask over the whole token
sequence: a token in latent frame i, which lies in clip c, sees the tokens of latent frame j when
  - j lies in clip c (clips: `frames` latent frames cut into `clips` contiguous pieces, sizes differing by at
    most one, the first ones longer), or
  - j lies within `local` frames before clip c's first frame or after its last, or
  - j is one of `count` global frames, evenly spaced over the video (numpy's linspace, rounded).
Nothing here imports paragen: this is what the partitioned implementation must equal.
"""
from __future__ import annotations

import numpy as np
import torch


def clip_of_frame(frames: int, clips: int) -> np.ndarray:
    """The clip index of every latent frame."""
    sizes = [frames // clips + (i < frames % clips) for i in range(clips)]
    return np.repeat(np.arange(clips), sizes)


def frame_mask(frames: int, clips: int, local: int, count: int) -> torch.Tensor:
    """`[frames, frames]`: True where a query frame (row) sees a key frame (column)."""
    owner = clip_of_frame(frames, clips)
    first = np.array([np.flatnonzero(owner == c)[0] for c in range(clips)])
    last = np.array([np.flatnonzero(owner == c)[-1] for c in range(clips)])
    g = np.unique(np.round(np.linspace(0, frames - 1, min(count, frames))).astype(int))
    seen = np.zeros((frames, frames), dtype=bool)
    for i in range(frames):
        c = owner[i]
        for j in range(frames):
            seen[i, j] = owner[j] == c or first[c] - local <= j <= last[c] + local or j in g
    return torch.from_numpy(seen)


class MaskedWanAttention:
    """The stock processor, given the frame mask expanded to tokens."""

    def __init__(self, stock, frames: int, clips: int, local: int, count: int) -> None:
        self.stock, self.mask = stock, frame_mask(frames, clips, local, count)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        per_frame = hidden_states.shape[1] // self.mask.shape[0]
        tokens = self.mask.repeat_interleave(per_frame, 0).repeat_interleave(per_frame, 1)
        return self.stock(attn, hidden_states, None, tokens, rotary_emb)


def install_wan_reference(pipe, frames: int, clips: int, local: int, count: int) -> None:
    """Dual-scope reference processors on the pipeline's self-attention modules (`frames`: latent frames)."""
    for block in pipe.transformer.blocks:
        block.attn1.set_processor(MaskedWanAttention(block.attn1.processor, frames, clips, local, count))
