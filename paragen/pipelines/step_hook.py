"""The step hook: code that runs after each scheduler step of a request, and may replace its latents.

Every workload that checkpoints (hires, video) or changes the latent between steps (hires structure
seeding) uses it. It intercepts `scheduler.step` (`paragen.parallel.intercept`), because every diffusers
pipeline steps its scheduler once per denoising step, while `callback_on_step_end` is missing from some
pipelines and belongs to the user.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from paragen.parallel.intercept import intercept, interceptions

TAG = "step_hook"
OnStep = Callable[[torch.Tensor], "torch.Tensor | None"]


def install_step_hook(scheduler: Any, on_step: OnStep) -> None:
    """After each `scheduler.step`, call `on_step(latents)`; a tensor it returns replaces the step's latents.
    Installing it on a scheduler that has it already does nothing (a pipeline keeps its scheduler across
    requests)."""
    if TAG in interceptions(scheduler, "step"):
        return

    def after_step(step, *args, **kwargs):
        out = step(*args, **kwargs)
        latents = out.prev_sample if hasattr(out, "prev_sample") else out[0]
        replaced = on_step(latents)
        if replaced is None or replaced is latents:
            return out
        if hasattr(out, "prev_sample"):
            out.prev_sample = replaced
            return out
        return (replaced,) + tuple(out[1:])

    intercept(scheduler, "step", after_step, tag=TAG)
