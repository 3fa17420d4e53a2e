"""A toy workload, as a new workload would be written: a package exporting `check` and `install`.

`ToyModel` doubles its input; installed, each rank computes its own slice of a vector and the slices are
concatenated (here with one rank, by hand), which is enough to see the registry drive the lifecycle.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from paragen.parallel.config import ParallelConfig
from paragen.parallel.intercept import intercept


@dataclass(frozen=True)
class ToyOptions:
    """The toy workload's own options."""

    scale: float = 1.0

    @property
    def tag(self) -> str:
        return f"toy{self.scale:g}"


class ToyModel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def check(model: ToyModel, config: ParallelConfig, options: ToyOptions) -> None:
    if options.scale <= 0:
        raise ValueError("scale must be positive")


def install(model: ToyModel, config: ParallelConfig, options: ToyOptions) -> ToyModel:
    model.paragen = (config, options)
    intercept(model, "forward", lambda forward, x: options.scale * forward(x), tag="toy.forward")
    return model
