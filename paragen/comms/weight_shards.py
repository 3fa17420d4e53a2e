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

_weight_groups: dict[int, dist.ProcessGroup] = {}  # id of the world group -> the weights' group made under it


def _group() -> dist.ProcessGroup:
    """The weights' own group over every rank (made once per process group, by every rank, on first use)."""
    world = id(dist.group.WORLD)
    if world not in _weight_groups:
        _weight_groups.clear()
        _weight_groups[world] = new_group(list(range(world_size())))[0]
    return _weight_groups[world]


@dataclass
class ShardedWeights:
    """One sharded model: its blocks in the order they ran, and the prefetch hooks that follow that order."""

    root: torch.nn.Module
    blocks: list[torch.nn.Module]
    order: list[torch.nn.Module] = field(default_factory=list)  # the blocks as the first forward ran them
    prefetches: int = 0  # gathers started ahead of their block
    _recording: bool = True

    def _started(self, block: torch.nn.Module) -> None:
        if self._recording:
            self.order.append(block)
            return
        following = self._next.get(id(block))
        if following is not None:
            following.unshard(async_op=True)
            self.prefetches += 1

    def _finished(self) -> None:
        if self._recording:
            self._recording = False
            self._next = {id(a): b for a, b in zip(self.order, self.order[1:]) if a is not b}
        self.root.reshard()


def shard_weights(root: torch.nn.Module, blocks: Sequence[torch.nn.Module], device: torch.device) -> ShardedWeights:
    """Shard `root`'s weights over every rank: each of `blocks` (submodules of `root`, none inside another) as one
    unit, the rest of `root` as another. `device`: where the weights are (the rank's device). The model computes as
    before; each rank keeps about `1/size` of the weights between forwards. Parameters of another dtype than most
    (the small ones a model keeps in float32 beside bfloat16 weights: norms, modulation tables) stay whole on every
    rank: FSDP2 gathers one dtype per unit."""
    if not is_initialized() or world_size() == 1:
        raise ValueError("sharding weights needs several ranks (a process group of more than one)")
    mesh = DeviceMesh.from_group(_group(), device_type=device.type)
    counts: dict[torch.dtype, int] = {}
    for parameter in root.parameters():
        counts[parameter.dtype] = counts.get(parameter.dtype, 0) + parameter.numel()
    main = max(counts, key=counts.get, default=None)
    whole = {parameter for parameter in root.parameters() if parameter.dtype != main}
    for module in [*blocks, root]:
        own = type(module)
        fully_shard(module, mesh=mesh, reshard_after_forward=True, ignored_params=whole)
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


def local_rows(parameter: torch.nn.Parameter) -> tuple[torch.Tensor, int]:
    """This rank's part of a parameter (writable: the rows it keeps, or the whole of one kept whole) and the first of
    those rows in the whole tensor: FSDP2 cuts dim 0 into chunks of ceil(rows / size), one per rank in mesh order."""
    if not isinstance(parameter, DTensor):
        return parameter.data, 0  # kept whole
    local = parameter.to_local()
    size, rank = parameter.device_mesh.size(), parameter.device_mesh.get_local_rank()
    whole = parameter.shape[0] if parameter.dim() else 1
    return local, rank * -(-whole // size)


__all__ = ["ShardedWeights", "is_sharded", "local_rows", "resident_bytes", "shard_weights"]
