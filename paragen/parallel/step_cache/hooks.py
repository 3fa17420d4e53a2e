"""Where a step cache enters a denoiser: its head runs every call, its body only when the step computes.

A `CachePlan` says which modules are the head and the body and what a served call puts in place of the body:
- `residual` (diffusion transformers): the head is the first transformer block, the body every later block. A
  served call adds to the head's output the residual the body added at the last computed call (or its forecast);
  the body's blocks hand their inputs on unchanged, in the form each block returns them (`BlockIO`).
- `features` (UNets, DeepCache's cut): the head is the first down block, whose output is the probe; the body is
  every later down block, the mid block and every up block but the last; the last up block and the output layers
  run every call on the features the body's last block gave at the last computed call (or their forecast). The
  body's down blocks hand on their input as every skip connection (only skipped up blocks read them).
Every interception is the innermost of its module (`intercept(..., innermost=True)`), so it sees the call as the
sharding plans pass it: this rank's shard in, this rank's shard out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from paragen.parallel.intercept import intercept
from paragen.parallel.step_cache.decide import StepCache

TAG = "step_cache"


def _first(args: tuple, kwargs: dict, name: str = "hidden_states") -> torch.Tensor:
    return args[0] if args else kwargs[name]


@dataclass(frozen=True)
class BlockIO:
    """How a transformer block takes and returns its streams: its forward's parameter names, and where its output
    tuple holds the hidden states and the text stream (`encoder_index` None: it returns the hidden states alone)."""

    params: tuple[str, ...]
    hidden_index: int = 0
    encoder_index: int | None = None
    hidden_arg: str = "hidden_states"
    encoder_arg: str = "encoder_hidden_states"

    def _argument(self, name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
        if name in kwargs:
            return kwargs[name]
        index = self.params.index(name) if name in self.params else len(args)
        return args[index] if index < len(args) else None

    def inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, text stream or None) of a call."""
        encoder = None if self.encoder_index is None else self._argument(self.encoder_arg, args, kwargs)
        return self._argument(self.hidden_arg, args, kwargs), encoder

    def outputs(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, text stream or None) of a returned value."""
        if not isinstance(output, tuple):
            return output, None
        return output[self.hidden_index], None if self.encoder_index is None else output[self.encoder_index]

    def returned(self, hidden: torch.Tensor, encoder: torch.Tensor | None, like: Any = None) -> Any:
        """The streams in the form the block returns them (`like`: a returned value whose other entries to keep)."""
        if self.encoder_index is None and not isinstance(like, tuple):
            return hidden
        out = list(like) if isinstance(like, tuple) else [None] * (max(self.hidden_index, self.encoder_index) + 1)
        out[self.hidden_index] = hidden
        if self.encoder_index is not None:
            out[self.encoder_index] = encoder
        return tuple(out)


@dataclass(frozen=True)
class CachePlan:
    """The head and body of one denoiser (module paths, in call order) and its `kind` (`residual` or `features`);
    `io`: a `residual` plan's blocks' `BlockIO`, by path; `joined`: see the field."""

    kind: str
    head: str
    body: tuple[str, ...]
    io: dict[str, BlockIO] = field(default_factory=dict)
    joined: bool = False  # `residual`: the last blocks take the text and image joined, the text first


def install(model: torch.nn.Module, plan: CachePlan, cache: StepCache, label: str) -> None:
    """Make `model` (one of the pipeline's denoisers, `label` its name) run through `cache` as `plan` says."""
    if not plan.body:
        raise ValueError(f"{type(model).__name__} has a single block: a step cache has nothing to skip")
    KINDS[plan.kind](model, plan, cache, label)


def _install_residual(model, plan: CachePlan, cache: StepCache, label: str) -> None:
    head_io = plan.io[plan.head]

    def head(original, *args, **kwargs):
        site = cache.open_call(label)
        hidden_in, _ = head_io.inputs(args, kwargs)
        with cache.head_scope():
            output = original(*args, **kwargs)
        hidden, encoder = head_io.outputs(output)
        if cache.decide(site, hidden - hidden_in):
            site.anchor = (hidden, encoder)
            return output
        residual = cache.served(site)
        if encoder is not None and residual[1] is not None:
            encoder = encoder + residual[1]
        return head_io.returned(hidden + residual[0], encoder, output)

    def body(io: BlockIO, last: bool):
        def around(original, *args, **kwargs):
            if not cache.computing:
                return io.returned(*io.inputs(args, kwargs))
            output = original(*args, **kwargs)
            if last:
                site = cache.current
                cache.store(site, _body_residual(io.outputs(output), site.anchor, plan.joined))
                site.anchor = None
            return output
        return around

    intercept(model.get_submodule(plan.head), "forward", head, tag=TAG, innermost=True)
    for path in plan.body:
        intercept(model.get_submodule(path), "forward", body(plan.io[path], path == plan.body[-1]), tag=TAG,
                  innermost=True)


def _body_residual(end: tuple, start: tuple, joined: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the body added to the head's streams: `end` (the last block's hidden states and text stream, or the two
    joined, the text first) minus `start` (the head's)."""
    (hidden, encoder), (start_hidden, start_encoder) = end, start
    if joined and start_encoder is not None and encoder is None:
        text = start_encoder.shape[1]
        if hidden.shape[1] != text + start_hidden.shape[1]:
            raise RuntimeError(f"the last block's {hidden.shape[1]} tokens are not the first block's {text} text and "
                               f"{start_hidden.shape[1]} image tokens joined: the step cache cannot split them")
        return hidden[:, text:] - start_hidden, hidden[:, :text] - start_encoder
    return hidden - start_hidden, None if encoder is None or start_encoder is None else encoder - start_encoder


def _install_features(model, plan: CachePlan, cache: StepCache, label: str) -> None:
    downs = [p for p in plan.body if p.startswith("down_blocks.")]

    def head(original, *args, **kwargs):
        site = cache.open_call(label)
        with cache.head_scope():
            output = original(*args, **kwargs)
        cache.decide(site, output[0])
        return output

    def down(path: str):
        def around(original, *args, **kwargs):
            site = cache.current
            if cache.computing:
                output = original(*args, **kwargs)
                site.extra[path] = len(output[1])  # how many skip connections it gives
                return output
            hidden = _first(args, kwargs)
            return hidden, (hidden,) * site.extra[path]
        return around

    def passing(original, *args, **kwargs):
        return original(*args, **kwargs) if cache.computing else _first(args, kwargs)

    def keeping(original, *args, **kwargs):
        if cache.computing:
            output = original(*args, **kwargs)
            cache.store(cache.current, (output,))
            return output
        return cache.served(cache.current)[0]

    intercept(model.get_submodule(plan.head), "forward", head, tag=TAG, innermost=True)
    for path in plan.body:
        around = down(path) if path in downs else keeping if path == plan.body[-1] else passing
        intercept(model.get_submodule(path), "forward", around, tag=TAG, innermost=True)


KINDS = {"residual": _install_residual, "features": _install_features}
