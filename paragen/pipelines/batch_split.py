"""Cut a model call's batched inputs down to one classifier-free-guidance branch, or repeat them for several inputs."""
from __future__ import annotations

from typing import Any

import torch


def split_batch(args: tuple, kwargs: dict, batch: int, index: int, parts: int) -> tuple[list, dict]:
    """Keep part `index` of `parts` of every tensor whose first dimension is `batch` (also inside dicts).

    Diffusers pipelines run CFG as one batch `[unconditional; conditional]`; every per-sample input
    (latents, timesteps, text states, pooled or added conditions) has that batch as its first dimension.
    """
    if batch % parts:
        raise ValueError(f"cfg={parts} needs the unconditional and conditional batch halves; the model got batch {batch}")
    size = batch // parts

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            return value[index * size : (index + 1) * size]
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    return [cut(a) for a in args], {k: cut(v) for k, v in kwargs.items()}


def repeat_batch(args: tuple, kwargs: dict, batch: int, times: int) -> tuple[list, dict]:
    """Repeat every tensor whose first dimension is `batch` (also inside dicts) `times` times along it,
    so one model call can run `times` inputs that share the same conditioning."""

    def grow(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            return value.repeat(times, *([1] * (value.ndim - 1)))
        if isinstance(value, dict):
            return {k: grow(v) for k, v in value.items()}
        return value

    return [grow(a) for a in args], {k: grow(v) for k, v in kwargs.items()}
