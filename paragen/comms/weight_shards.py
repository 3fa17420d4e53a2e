"""A model's weights sharded over the job's ranks with PyTorch's FSDP2 (`fully_shard` over a device mesh), for
forward-only generation.

Each named block keeps its rank's shard of every weight (dim 0, in `1/size` chunks); just before the block runs its
weights are all-gathered, and after it they are freed again. The root keeps the weights outside the blocks
(embeddings, final norms) the same way, gathered for its forward and freed after it (FSDP2 keeps a root's weights
whole after forward, for a backward that generation never runs, so paragen reshards it).

Prefetch: the first forward records the order in which the blocks run; from the second forward on, a block's start
also starts the next block's all-gather (asynchronous), so that gather runs while the block computes. FSDP2's own
forward prefetch on CUDA overlaps through its all-gather streams; an explicit asynchronous gather does it on every
backend, gloo included.

The weights are gathered over a process group of their own, so that their gathers never queue behind (or ahead of)
the activations' exchanges on the mesh's groups.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from paragen.comms.world import is_initialized, new_group, world_size

_weight_group: dist.ProcessGroup | None = None


def _group() -> dist.ProcessGroup:
    """The weights' own group over every rank (made once, by every rank, on first use)."""
    global _weight_group
    if _weight_group is None:
        _weight_group = new_group(list(range(world_size())))[0]
    return _weight_group


@dataclass
class ShardedWeights:
    """One sharded model: its blocks in the order they ran, and the prefetch hooks that follow that order."""

    root: torch.nn.Module
    blocks: list[torch.nn.Module]
    order: list[torch.nn.Module] = field(default_factory=list)  # the blocks as the first forward ran them
    _recording: bool = True

    def _started(self, block: torch.nn.Module) -> None:
        if self._recording:
            self.order.append(block)
            return
        following = self._next.get(id(block))
        if following is not None:
            following.unshard(async_op=True)

    def _finished(self) -> None:
        if self._recording:
            self._recording = False
            self._next = {id(a): b for a, b in zip(self.order, self.order[1:]) if a is not b}
        self.root.reshard()


def shard_weights(root: torch.nn.Module, blocks: Sequence[torch.nn.Module], device: torch.device) -> ShardedWeights:
    """Shard `root`'s weights over every rank: each of `blocks` (submodules of `root`, none inside another) as one
    unit, the rest of `root` as another. `device`: where the weights are (the rank's device). The model computes as
    before; each rank keeps about `1/size` of the weights between forwards."""
    if not is_initialized() or world_size() == 1:
        raise ValueError("sharding weights needs several ranks (a process group of more than one)")
    mesh = DeviceMesh.from_group(_group(), device_type=device.type)
    for module in [*blocks, root]:
        own = type(module)
        fully_shard(module, mesh=mesh, reshard_after_forward=True)
        _keep_name(type(module), own)
    sharded = ShardedWeights(root, list(blocks))
    for block in blocks:
        block.register_forward_pre_hook(lambda module, args: sharded._started(module))
    root.register_forward_hook(lambda module, args, output: sharded._finished())
    return sharded


def _keep_name(wrapper: type, own: type) -> None:
    """Give FSDP2's subclass of a module's class (`FSDP<name>`) the class's own name and module, as
    `paragen.parallel.intercept` does for its subclasses: paragen's plans and grids look classes up by name, and
    transformers looks a model's recordable outputs up by `str(model.__class__)`."""
    wrapper.__name__, wrapper.__qualname__, wrapper.__module__ = own.__name__, own.__qualname__, own.__module__


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether `module`'s weights are sharded by `shard_weights`."""
    return isinstance(module, FSDPModule)


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s parameters this rank holds now: its shard of a sharded one, the whole of the others."""
    total = 0
    for parameter in module.parameters():
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        total += local.numel() * local.element_size()
    return total


def release_weight_group() -> None:
    """Forget the weights' group (at teardown, with the process group)."""
    global _weight_group
    _weight_group = None


__all__ = ["ShardedWeights", "is_sharded", "release_weight_group", "resident_bytes", "shard_weights"]
