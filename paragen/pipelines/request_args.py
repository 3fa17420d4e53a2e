"""Reading and completing a pipeline call's arguments before any collective (see `PipelineRuntime.call`)."""
from __future__ import annotations

import inspect
from typing import Any

import torch

from paragen.comms import GroupComm, broadcast_int

MAX_SIDE = 16384  # pixels a side; beyond this a request is a typo, not an image or a video (hires 8K is 8192)
MAX_FRAMES = 1_000_000  # frames of a video


def request_arg(bound: inspect.BoundArguments, name: str) -> Any:
    """The value the pipeline will see for `name`: passed, or the signature's default."""
    if name in bound.arguments:
        return bound.arguments[name]
    return bound.signature.parameters[name].default


def share_generator(bound: inspect.BoundArguments, comm: GroupComm) -> None:
    """With no generator and no latents passed, give every rank the same generator (seeded by rank 0)."""
    if request_arg(bound, "generator") is None and request_arg(bound, "latents") is None:
        seed = broadcast_int(comm, int(torch.randint(0, 2**62, (1,), device="cpu").item()))  # host-side: a seed
        bound.arguments["generator"] = torch.Generator(device="cpu").manual_seed(seed)


def check_steps(bound: inspect.BoundArguments) -> None:
    """Refuse a non-positive step count before any collective."""
    steps = request_arg(bound, "num_inference_steps")
    if steps is not None and steps <= 0:
        raise ValueError(f"num_inference_steps must be positive, got {steps}")
