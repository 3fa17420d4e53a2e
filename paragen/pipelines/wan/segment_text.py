"""Per-segment prompts for Wan: every video token cross-attends to the prompt of its latent frame's segment.

Wan's blocks cross-attend each token to the text, projected once per call by the transformer's
`condition_embedder.text_embedder`. With segment prompts, the runtime projects every segment's prompt with the
same layer during the conditional call, and the cross-attention of each block runs once per run of
consecutive tokens of one segment, with that segment's text (the unconditional call keeps the negative prompt).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

# The runs of this rank's tokens and their texts for this call: [(start, stop, text [T, C])], or None.
TextRuns = Callable[[], "list[tuple[int, int, torch.Tensor]] | None"]


def token_runs(bounds: tuple[int, int], per_frame: int, segment_of_frame: list[int]) -> list[tuple[int, int, int]]:
    """`(start, stop, segment)` runs of the tokens `bounds` of the whole video (positions relative to
    `bounds[0]`), frame-major with `per_frame` tokens a frame, `segment_of_frame[f]` the segment of frame f."""
    start, stop = bounds
    runs: list[tuple[int, int, int]] = []
    for frame in range(start // per_frame, (stop - 1) // per_frame + 1):
        low, high = max(start, frame * per_frame) - start, min(stop, (frame + 1) * per_frame) - start
        segment = segment_of_frame[frame]
        if runs and runs[-1][2] == segment:
            runs[-1] = (runs[-1][0], high, segment)
        else:
            runs.append((low, high, segment))
    return runs


class SegmentCrossAttention:
    """Wraps a Wan cross-attention processor: during a conditional call with segment prompts, each run of
    tokens attends to its segment's projected text."""

    def __init__(self, inner: Any, runs: TextRuns) -> None:
        self.inner, self.runs = inner, runs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        runs = self.runs()
        if runs is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        batch = hidden_states.shape[0]
        return torch.cat([
            self.inner(attn, hidden_states[:, start:stop], text.expand(batch, -1, -1).to(encoder_hidden_states),
                       attention_mask, rotary_emb)
            for start, stop, text in runs
        ], dim=1)
