"""The `pipe(...)` wrapper every parallelised pipeline gets, and the request helpers it uses.

`parallelize` gives the pipeline instance a same-named subclass whose `__call__` lets the runtime
check the request on every rank before any collective, then brackets the call with
`begin_request` / `end_request` (the step plan: warm-up, stale steps).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from paragen.comms import GroupComm, broadcast_int

_PARALLEL_CLASSES: dict[type, type] = {}


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


def parallel_class(cls: type) -> type:
    """A subclass of `cls` (same name) whose `__call__` runs `self.paragen`'s request protocol."""
    if cls not in _PARALLEL_CLASSES:
        original = cls.__call__
        signature = inspect.signature(original)

        def __call__(self, *args, **kwargs):
            options = self.paragen.take_options(kwargs)  # paragen's own call options, if the runtime has any
            bound = signature.bind(self, *args, **kwargs)
            self.paragen.prepare_call(self, bound, **options)
            self.paragen.begin_request()
            try:
                return original(*bound.args, **bound.kwargs)
            finally:
                self.paragen.end_request()

        __call__.__doc__ = original.__doc__
        _PARALLEL_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _PARALLEL_CLASSES[cls]
