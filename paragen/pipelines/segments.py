"""Per-segment prompts of a video: paragen's call options `segment_prompts=[...]` and `segment_frames=[...]`.

A video may be cut into consecutive segments, each with its own prompt (lengths: `segment_frames`, default as
even as possible). Both video workloads take them: a UNet video model's frames each cross-attend to their
segment's prompt, a Wan model's video tokens to the segment of their latent frame.
"""
from __future__ import annotations

import inspect

from paragen.parallel.partition import split_sizes
from paragen.pipelines.request_args import request_arg

SEGMENT_OPTIONS = ("segment_prompts", "segment_frames")


def take_segment_options(kwargs: dict) -> dict:
    """Remove paragen's segment options from a pipeline call's keyword arguments and return them."""
    return {name: kwargs.pop(name) for name in SEGMENT_OPTIONS if name in kwargs}


def segment_bounds(frames: int, segments: int, lengths: list[int] | None) -> list[int]:
    """The segment index of every frame; ValueError if the prompts and the segment lengths do not match."""
    if lengths is None:
        if segments > frames:
            raise ValueError(f"{segments} segment prompts for {frames} frames: a segment needs at least one frame")
        lengths = split_sizes(frames, segments)
    if len(lengths) != segments:
        raise ValueError(f"{segments} segment prompts but {len(lengths)} segment lengths: give one length per prompt")
    if any(n < 1 for n in lengths) or sum(lengths) != frames:
        raise ValueError(f"segment lengths {lengths} must be positive and add up to num_frames ({frames})")
    return [i for i, n in enumerate(lengths) for _ in range(n)]


def check_segment_request(bound: inspect.BoundArguments, frames: int, prompts: list[str] | None,
                          lengths: list[int] | None) -> list[int] | None:
    """Check a call's segment options against its other arguments; the segment of every frame (None without
    segment prompts). Sets the call's `prompt` to the first segment's: the pipeline's own batch and
    unconditional embedding come from it."""
    if prompts is None:
        if lengths is not None:
            raise ValueError("segment_frames needs segment_prompts (one prompt per segment)")
        return None
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("segment_prompts must be a non-empty list of prompts, one per segment")
    if request_arg(bound, "prompt") is not None or request_arg(bound, "prompt_embeds") is not None:
        raise ValueError("give either prompt (one for the whole video) or segment_prompts, not both")
    if bound.arguments.get("num_videos_per_prompt") not in (None, 1):
        raise ValueError("segment prompts make one video per call (num_videos_per_prompt=1)")
    of_frame = segment_bounds(frames, len(prompts), lengths)
    bound.arguments["prompt"] = prompts[0]
    return of_frame
