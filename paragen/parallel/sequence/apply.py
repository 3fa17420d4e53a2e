"""Apply a `ShardingPlan` to a transformer: its splits and gathers as interceptions of the planned modules.

`PlannedSharding.install(transformer)` finds every module the plan names (a missing one is an error before
anything changes) and intercepts its `forward` (tag `sequence.plan`): named inputs are cut to this rank's slice
before the call, planned outputs after it, gathers all-gather the output. The slices come from the `TokenLayout`
the runtime gives for the current forward (`begin_forward`); the first split the plan declares is the stream the
gathers collect, and its whole length is taken from the tensor it cuts.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from paragen.parallel.intercept import intercept
from paragen.parallel.sequence.layout import TokenLayout
from paragen.parallel.sequence.plan import Gather, ShardingPlan, Split, resolve

TAG = "sequence.plan"


def _narrow(value: Any, split: Split, layout: TokenLayout) -> tuple[Any, int | None]:
    """`value` cut to this rank's slice (each tensor of a tuple or list), and the whole length it had."""
    if isinstance(value, (tuple, list)):
        parts = [_narrow(item, split, layout) for item in value]
        lengths = [n for _, n in parts if n is not None]
        return type(value)(part for part, _ in parts), (lengths[0] if lengths else None)
    if not isinstance(value, torch.Tensor) or (split.dims is not None and value.dim() != split.dims):
        return value, None
    length = value.shape[split.dim]
    start, end = layout.bounds(length)
    return value.narrow(split.dim, start, end - start), length


def planned_modules(plan: ShardingPlan, transformer: torch.nn.Module) -> list[tuple[str, str, torch.nn.Module]]:
    """Every (plan path, module name, module) the plan names in `transformer`; ValueError for a path it lacks."""
    what = f"{type(transformer).__name__} ({plan.source})"
    return [(path, name, module) for path in plan.modules for name, module in resolve(transformer, path, what)]


class PlannedSharding:
    """A plan installed on one transformer; `layout` gives the current forward's `TokenLayout`."""

    def __init__(self, plan: ShardingPlan, layout: Callable[[], TokenLayout], label: str) -> None:
        self.plan = plan
        self.layout = layout
        self.label = label
        splits = plan.splits()
        if not splits:
            raise ValueError("a sharding plan needs at least one split")
        self.stream = splits[0][:2]  # (path, key) of the split whose stream the gathers collect
        self.stream_length: int | None = None

    def begin_forward(self) -> None:
        """A new transformer forward: the output stream's length is learnt again."""
        self.stream_length = None

    def install(self, transformer: torch.nn.Module) -> None:
        """Intercept every planned module of `transformer`; ValueError, before any change, for a missing one."""
        for path, name, module in planned_modules(self.plan, transformer):
            entry = self.plan.modules[path]
            if isinstance(entry, (Gather, tuple)):
                gathers = entry if isinstance(entry, tuple) else (entry,)
                intercept(module, "forward", self._gathering(gathers, name), tag=TAG)
            else:
                intercept(module, "forward", self._splitting(path, entry, inspect.signature(module.forward)), tag=TAG)

    def _record(self, path: str, key: Any, length: int | None) -> None:
        if (path, key) == self.stream and length is not None:
            self.stream_length = length

    def _splitting(self, path: str, entry, signature: inspect.Signature):
        inputs = {key: split for key, split in entry.items() if not split.output}
        outputs = {key: split for key, split in entry.items() if split.output}

        def around(forward, *args, **kwargs):
            layout = self.layout()
            if inputs:
                bound = signature.bind_partial(*args, **kwargs)
                for key, split in inputs.items():
                    if bound.arguments.get(key) is not None:
                        bound.arguments[key], length = _narrow(bound.arguments[key], split, layout)
                        self._record(path, key, length)
                args, kwargs = bound.args, bound.kwargs
            output = forward(*args, **kwargs)
            if not outputs:
                return output
            if isinstance(output, torch.Tensor):
                output, length = _narrow(output, outputs[0], layout) if 0 in outputs else (output, None)
                self._record(path, 0, length)
                return output
            parts = list(output)
            for index, split in outputs.items():
                parts[index], length = _narrow(parts[index], split, layout)
                self._record(path, index, length)
            return type(output)(parts)

        return around

    def _gathering(self, gathers: tuple[Gather, ...], name: str):
        def gather(value: Any, spec: Gather) -> Any:
            if not isinstance(value, torch.Tensor) or (spec.dims is not None and value.dim() != spec.dims):
                return value
            if self.stream_length is None:
                raise RuntimeError(f"{name}: a gather ran before the plan's output stream was split")
            return self.layout().gather(value.contiguous(), spec.dim, self.stream_length, f"{self.label}output")

        def around(forward, *args, **kwargs):
            output = forward(*args, **kwargs)
            if isinstance(output, torch.Tensor):
                return gather(output, gathers[0])
            parts = list(output)
            for index, spec in enumerate(gathers):
                parts[index] = gather(parts[index], spec)
            return type(output)(parts)

        return around
