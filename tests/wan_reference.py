"""A single-process reference of dual-scope clips for Wan's 3D self-attention, written apart from paragen.

`install_wan_reference(pipe, frames, clips, local, count)` wraps the stock `WanAttnProcessor` of every
self-attention (`attn1`) of a stock `WanPipeline` so that it runs with a boolean mask over the whole token
sequence: a token in latent frame i, which lies in clip c, sees the tokens of latent frame j when
  - j lies in clip c (clips: `frames` latent frames cut into `clips` contiguous pieces, sizes differing by at
    most one, the first ones longer), or
  - j lies within `local` frames before clip c's first frame or after its last, or
  - j is one of `count` global frames, evenly spaced over the video (numpy's linspace, rounded).
`install_segment_reference(pipe, prompts, segment_of_latent, max_sequence_length)` gives each token of latent
frame l, in the conditional transformer call, the cross-attention output computed with prompt
`segment_of_latent[l]` (the stock processor run once per prompt over every token).
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


class SegmentTextReference:
    """The stock cross-attention run once per segment prompt over all tokens; each token keeps the output of
    its latent frame's segment (conditional calls only: the odd-numbered transformer calls)."""

    def __init__(self, stock, state: dict, texts: list[torch.Tensor], segment_of_latent: list[int], project) -> None:
        self.stock, self.state, self.texts, self.project = stock, state, texts, project
        self.segments = torch.tensor(segment_of_latent)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self.state["calls"] % 2 == 0:  # the unconditional call of the step
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        per_frame = hidden_states.shape[1] // len(self.segments)
        of_token = self.segments.repeat_interleave(per_frame)
        outs = [self.stock(attn, hidden_states, self.project(text), None, None) for text in self.texts]
        out = outs[0].clone()
        for segment, other in enumerate(outs):
            out[:, of_token == segment] = other[:, of_token == segment]
        return out


def install_segment_reference(pipe, prompts: list[str], segment_of_latent: list[int], max_sequence_length: int) -> None:
    """Segment-prompt reference processors on the cross-attention (`attn2`) modules of a stock Wan pipeline,
    which must be called with guidance (two transformer calls a step, the conditional first)."""
    texts = [pipe.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)[0]
             for p in prompts]
    state = {"calls": 0}
    pipe.transformer.register_forward_pre_hook(lambda module, args: state.update(calls=state["calls"] + 1))
    project = pipe.transformer.condition_embedder.text_embedder
    for block in pipe.transformer.blocks:
        block.attn2.set_processor(SegmentTextReference(block.attn2.processor, state, texts, segment_of_latent, project))
