"""A transformer's sharding plan as data, in the form diffusers declares its context-parallel plans (`_cp_plan`).

A plan maps module paths of the transformer to what happens at them:
- `{input: Split}`: the named inputs (or, with `Split.output`, the outputs at these tuple indices — index 0 of a
  module returning one tensor is that tensor) are cut along `Split.dim` to this rank's shard before the module
  runs (after it, for outputs); `input.i` (`.i.j`…) names element `i` of a tuple input, the others passing whole
  (Allegro's `image_rotary_emb` is (frequency tables, token positions): only the positions are cut);
- `Gather` (or a tuple of them, one per output): the module's output is all-gathered along `Gather.dim`.
A tuple of splits for one input or output gives alternatives: the first whose `dims` the tensor has is used (LTX-2's
rotary tables are `[B, L, D]` or `[B, H, L, D/2]`, by its config). Paths are dotted module names; `""` is the
transformer itself, `*` stands for any one name (`blocks.*` is every block). A split or gather whose tensor has other than `dims` dimensions is left alone (as diffusers does: an
input a variant of the model gives in another form).

Beside diffusers' fields a plan says which attention modules attend to keys that are whole on every rank
(`replicated`: cross-attention to an unsplit text), so the attention seam leaves them alone; which are linear
attention (`linear`: a ReLU kernel, whose sum over the keys one all-reduce completes); and, for a model that folds
its tokens back into their grid between attentions (SANA's Mix-FFN), which convs run over that grid (`row_convs`:
each shard then holds whole rows and gets its neighbours' edge rows) and which integer inputs count the grid's rows
(`Rows`: replaced by the shard's rows); an integer input that is a stream's length is `Length` (replaced by the
shard's). Every other attention module's keys are the split tokens. The first split a plan declares is its output
stream: what the gathers collect. `from_diffusers` reads a diffusers `_cp_plan` into
this form without importing diffusers' types.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

import torch


@dataclass(frozen=True)
class Split:
    """Cut a tensor along `dim` into this rank's shard (`output`: a module output, else an input).

    `joins`: the tensor's `dim` is the concatenation of these streams (named by the inputs they were split as,
    e.g. an attention mask over `[video, text]`); each part is cut by its own stream and the parts joined again.
    One of them may be a stream not learnt yet: it is the rest of the tensor, and its length is learnt there (Helios'
    history tokens before the newest frames', whose count is an input: `Length`).
    `stream`: the name the stream's length is kept under (default: the input's name), for a stream cut where an input
    of the same name carries another one (Z-Image's image tokens, refined before they join the caption).
    """

    dim: int
    dims: int | None = None
    output: bool = False
    joins: tuple[str, ...] = ()
    stream: str | None = None


@dataclass(frozen=True)
class Gather:
    """All-gather a module output's shards along `dim` (`stream`: the input name the stream was split as; default:
    the plan's first split)."""

    dim: int
    dims: int | None = None
    stream: str | None = None


@dataclass(frozen=True)
class Rows:
    """An integer input that counts the rows of the token grid (a block that folds its tokens back into the grid):
    replaced by the rows of this rank's shard (the layout then cuts the grid by whole rows)."""


@dataclass(frozen=True)
class Length:
    """An integer input that is the whole length of a stream (learnt under the name `stream`): replaced by the
    length of this rank's shard of it."""

    stream: str


# inputs/outputs to split (a tuple of splits: alternatives by dimensions), or the output gather(s)
Entry = Union[Mapping[Union[str, int], Union[Split, Rows, Length, tuple]], Gather, tuple]


@dataclass(frozen=True)
class ShardingPlan:
    """Where a transformer's sequence is split and gathered, and which attention modules see whole keys."""

    modules: Mapping[str, Entry]
    replicated: tuple[str, ...] = ()  # attention-module path patterns whose keys are whole on every rank
    linear: tuple[str, ...] = ()  # attention-module path patterns whose attention is ReLU linear attention
    row_convs: tuple[str, ...] = ()  # path patterns of convs over the token grid (shards of whole rows, halos)
    source: str = "paragen"  # "diffusers" when read from the class's `_cp_plan`

    def splits(self) -> list[tuple[str, str | int, Split | Rows | Length]]:
        """Every split as (path, input name or output index, Split, Rows or Length), in declaration order."""
        return [(path, key, split) for path, entry in self.modules.items() for key, split in entry_splits(entry).items()]

    def gathers(self) -> list[tuple[str, tuple[Gather, ...]]]:
        """Every gather as (path, one Gather per output)."""
        return [(path, entry_gathers(entry)) for path, entry in self.modules.items() if entry_gathers(entry)]


def entry_splits(entry: Entry) -> Mapping[str | int, Split | Rows | Length]:
    """The splits of one plan entry (none for a gather)."""
    return entry if isinstance(entry, Mapping) else {}


def entry_gathers(entry: Entry) -> tuple[Gather, ...]:
    """The gathers of one plan entry, one per output (none for splits)."""
    if isinstance(entry, Mapping):
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def from_diffusers(cp_plan: Mapping[str, Any], replicated: tuple[str, ...] = ()) -> ShardingPlan:
    """A diffusers `_cp_plan` (ContextParallelInput / ContextParallelOutput values) in paragen's form."""
    modules: dict[str, Entry] = {}
    for path, entry in cp_plan.items():
        if isinstance(entry, Mapping):
            modules[path] = {key: Split(value.split_dim, value.expected_dims, bool(value.split_output))
                             for key, value in entry.items()}
        elif isinstance(entry, (list, tuple)):
            modules[path] = tuple(Gather(value.gather_dim, value.expected_dims) for value in entry)
        else:
            modules[path] = Gather(entry.gather_dim, entry.expected_dims)
    return ShardingPlan(modules, replicated, source="diffusers")


def _pattern(path: str) -> str:
    return "^" + ".".join("[^.]+" if part == "*" else re.escape(part) for part in path.split(".")) + "$"


def resolve(model: torch.nn.Module, path: str, what: str) -> list[tuple[str, torch.nn.Module]]:
    """The modules of `model` at `path` (`*`: any one name, `-1`: the last of a list); ValueError naming `what`
    when there are none."""
    found = [("", model)]
    for part in path.split(".") if path else []:
        step = []
        for name, module in found:
            children = dict(module.named_children())
            if part == "*":
                picked = list(children.items())
            elif part == "-1" and children:
                picked = [list(children.items())[-1]]
            else:
                picked = [(part, children[part])] if part in children else []
            step += [(f"{name}.{child}" if name else child, sub) for child, sub in picked]
        found = step
    if not found:
        raise ValueError(f"the sharding plan of {what} names module {path!r}, which {type(model).__name__} does not "
                         "have (a plan written for another version of the class?)")
    return found


def matches(path: str, patterns: tuple[str, ...]) -> bool:
    """Whether the module path `path` matches one of the plan path `patterns` (`*`: any one name)."""
    return any(re.match(_pattern(p), path) for p in patterns)
