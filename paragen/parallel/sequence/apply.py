"""Apply a `ShardingPlan` to a transformer: its splits and gathers as interceptions of the planned modules.

`PlannedSharding.install(transformer)` finds every module the plan names (a missing one is an error before
anything changes) and intercepts its `forward` once (tag `sequence.plan`), with every entry that names it: named
inputs (or an element of a tuple input, `input.i`) are cut to this rank's slice before the call (plain splits
first, then those that join several streams), an input counting the grid's rows (`Rows`) becomes the shard's rows,
an input that is a stream's length (`Length`) is learnt as that length (before the splits) and becomes the shard's,
planned outputs are cut after the call, gathers all-gather the output. The slices come from the `TokenLayout` the
runtime gives for the current forward (`begin_forward`). Each split records its stream's whole length under its
input name (`0`, `1`… for outputs); the first split the plan declares is the stream gathers collect unless they
name another. A module that cuts that stream's input itself and gathers its own output (diffusers' Helios plan cuts
and gathers around every attention and feed-forward, and its cross-attention sees only the newest frames' tokens)
gathers by the length it cut.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from paragen.parallel.intercept import intercept
from paragen.parallel.sequence.layout import TokenLayout
from paragen.parallel.sequence.plan import (Gather, Length, Rows, ShardingPlan, Split, entry_gathers, entry_splits,
                                            resolve)

TAG = "sequence.plan"


def planned_modules(plan: ShardingPlan, transformer: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, list]]:
    """Module name -> (module, the plan entries that name it, in declaration order); ValueError for a path the
    transformer lacks."""
    what = f"{type(transformer).__name__} ({plan.source})"
    found: dict[str, tuple[torch.nn.Module, list]] = {}
    for path, entry in plan.modules.items():
        for name, module in resolve(transformer, path, what):
            found.setdefault(name, (module, []))[1].append(entry)
    return found


def _first(split: Split | tuple[Split, ...]) -> Split:
    """A split, or the first of its alternatives (they agree on input or output, and on joins)."""
    return split[0] if isinstance(split, tuple) else split


class PlannedSharding:
    """A plan installed on one transformer; `layout` gives the current forward's `TokenLayout`."""

    def __init__(self, plan: ShardingPlan, layout: Callable[[], TokenLayout], label: str) -> None:
        self.plan = plan
        self.layout = layout
        self.label = label
        splits = [_first(split).stream or key for _, key, split in plan.splits()
                  if not isinstance(split, (Rows, Length))]
        if not splits:
            raise ValueError("a sharding plan needs at least one split")
        self.stream = splits[0]  # the key of the split whose stream the gathers collect by default
        self.lengths: dict[Any, int] = {}  # this forward's whole stream lengths, by the key they were split under
        self._shape: tuple | None = ()  # `shape()`, kept until a new stream is learnt
        # this forward's joined cuts, by (id of the whole tensor, split): the whole tensor (so that its id stays its
        # own) and the cut. Every block is given the same whole modulation, rotary table or mask.
        self._joined: dict[tuple[int, Split], tuple[torch.Tensor, torch.Tensor]] = {}

    def shape(self) -> tuple:
        """The whole lengths of this forward's streams so far (the same on every rank); asked by every attention call,
        worked out again only after a stream is learnt."""
        if self._shape is None:
            self._shape = tuple(sorted(self.lengths.items(), key=str))
        return self._shape

    def begin_forward(self) -> None:
        """A new transformer forward: the streams' lengths are learnt again."""
        self.lengths, self._shape, self._joined = {}, (), {}

    def install(self, transformer: torch.nn.Module) -> None:
        """Intercept every planned module of `transformer`; ValueError, before any change, for a missing one."""
        for name, (module, entries) in planned_modules(self.plan, transformer).items():
            splits = {key: split for entry in entries for key, split in entry_splits(entry).items()}
            gathers = [gather for entry in entries for gather in entry_gathers(entry)]
            intercept(module, "forward", self._around(name, splits, gathers, inspect.signature(module.forward)), tag=TAG)

    # ---- cutting ---------------------------------------------------------------------------------------
    def _cut(self, value: Any, split: Split | tuple[Split, ...], key: Any, layout: TokenLayout,
             seen: dict | None = None) -> Any:
        """`value` cut to this rank's slice (each tensor of a tuple or list); records the stream's whole length (in
        `seen` too: what this call cut)."""
        if isinstance(value, (tuple, list)):
            return type(value)(self._cut(item, split, key, layout, seen) for item in value)
        if isinstance(split, tuple):  # alternatives: the first whose dimensions the tensor has
            split = next((s for s in split if isinstance(value, torch.Tensor) and value.dim() == s.dims), None)
            if split is None:
                return value
        if not isinstance(value, torch.Tensor) or (split.dims is not None and value.dim() != split.dims):
            return value
        dim, joins, length = split.dim, split.joins, value.shape[split.dim]
        if not joins:
            stream = split.stream or key
            if stream not in self.lengths:
                self.lengths[stream], self._shape = length, None
            if seen is not None:
                seen[stream] = length
            begin, end = layout.bounds(length)
            return value.narrow(dim, begin, end - begin)
        done = self._joined.get((id(value), split))
        if done is not None:  # cut already for an earlier block of this forward
            return done[1]
        unknown = [stream for stream in joins if stream not in self.lengths]
        if len(unknown) > 1:
            raise RuntimeError(f"a split joining {joins} met {unknown} before their lengths were learnt")
        if unknown:  # the rest of the tensor
            rest = length - sum(self.lengths[stream] for stream in joins if stream not in unknown)
            if rest < 0:
                raise RuntimeError(f"a split joining {joins} got {length} tokens along dim {dim}, fewer than the "
                                   "streams it joins")
            self.lengths[unknown[0]], self._shape = rest, None
        parts, start = [], 0
        for stream in joins:
            whole = self.lengths[stream]
            if whole:  # an empty stream (no history yet) has nothing to cut
                begin, end = layout.bounds(whole)
                parts.append(value.narrow(dim, start + begin, end - begin))
            start += whole
        if start != length:
            raise RuntimeError(f"a split joining {joins} expected {start} tokens along dim {dim}, got {length}")
        cut = torch.cat(parts, dim)
        self._joined[id(value), split] = (value, cut)
        return cut

    def _shard_length(self, whole: Any, stream: str, layout: TokenLayout, seen: dict) -> Any:
        """An input that is `stream`'s whole length: learnt as such, and this rank's length of it instead."""
        whole = int(whole)
        if stream not in self.lengths:
            self.lengths[stream], self._shape = whole, None
        elif self.lengths[stream] != whole:
            raise RuntimeError(f"an input says stream {stream!r} has {whole} tokens; this forward's has "
                               f"{self.lengths[stream]}")
        seen[stream] = whole
        begin, end = layout.bounds(whole)
        return end - begin

    def _cut_item(self, value: Any, path: list[int], split: Split, key: Any, layout: TokenLayout, seen: dict) -> Any:
        """`value` with its element at `path` (tuple indices; none: `value` itself) cut; the rest whole."""
        if not path:
            return self._cut(value, split, key, layout, seen)
        if not isinstance(value, (tuple, list)) or not -len(value) <= path[0] < len(value):
            raise RuntimeError(f"a split of {key!r} expected a tuple with an element {path[0]}, got "
                               f"{type(value).__name__}")
        items = list(value)
        items[path[0]] = self._cut_item(items[path[0]], path[1:], split, key, layout, seen)
        return type(value)(items)

    def _gather(self, value: Any, spec: Gather, name: str, seen: dict) -> Any:
        if not isinstance(value, torch.Tensor) or (spec.dims is not None and value.dim() != spec.dims):
            return value
        stream = self.stream if spec.stream is None else spec.stream
        length = seen.get(stream, self.lengths.get(stream))
        if length is None:
            raise RuntimeError(f"{name}: a gather of stream {stream!r} ran before that stream was split")
        return self.layout().gather(value.contiguous(), spec.dim, length, f"{self.label}output")

    def _around(self, name: str, splits: dict, gathers: list[Gather], signature: inspect.Signature):
        rows = [key for key, split in splits.items() if isinstance(split, Rows)]
        counts = {key: split.stream for key, split in splits.items() if isinstance(split, Length)}
        cuts = {key: split for key, split in splits.items() if not isinstance(split, (Rows, Length))}
        inputs = sorted(((k, s) for k, s in cuts.items() if not _first(s).output),
                        key=lambda item: bool(_first(item[1]).joins))
        outputs = {key: split for key, split in cuts.items() if _first(split).output}

        def around(forward, *args, **kwargs):
            layout, seen = self.layout(), {}
            if inputs or rows or counts:
                bound = signature.bind_partial(*args, **kwargs)
                for key, stream in counts.items():
                    if bound.arguments.get(key) is not None:
                        bound.arguments[key] = self._shard_length(bound.arguments[key], stream, layout, seen)
                for key, split in inputs:
                    argument, *path = key.split(".")  # `input.i`: element i of a tuple input
                    if bound.arguments.get(argument) is not None:
                        bound.arguments[argument] = self._cut_item(bound.arguments[argument], [int(i) for i in path],
                                                                   split, key, layout, seen)
                for key in rows:
                    if bound.arguments.get(key) is not None:
                        bound.arguments[key] = layout.rows(bound.arguments[key])
                args, kwargs = bound.args, bound.kwargs
            output = forward(*args, **kwargs)
            single = isinstance(output, torch.Tensor)
            parts = [output] if single else list(output)
            for index, split in outputs.items():
                parts[index] = self._cut(parts[index], split, index, layout)
            for index, spec in enumerate(gathers):
                parts[index] = self._gather(parts[index], spec, name, seen)
            if not (outputs or gathers):
                return output
            return parts[0] if single else type(output)(parts)

        return around
