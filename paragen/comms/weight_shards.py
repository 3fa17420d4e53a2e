"""A model's weights sharded over the job's ranks with PyTorch's FSDP2 (`fully_shard` over a device mesh), for
forward-only generation.

Each named block keeps its rank's shard of every weight (dim 0, in `1/size` chunks); just before the block runs its
weights are all-gathered, and after it they are freed again. The root keeps the weights outside the blocks
(embeddings, final norms) the same way, gathered for its forward and freed after it (`free_gathered`).
`gather_ahead` starts a block's gather early (asynchronous), so that it runs while the block before computes: FSDP2's
own forward prefetch overlaps through CUDA streams; an explicit asynchronous gather does it on every backend, gloo
included (`paragen.parallel.weights` calls it in the order the blocks run).

The weights are gathered over a process group of their own, so that their gathers never queue behind (or ahead of)
the activations' exchanges on the mesh's groups.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
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


def shard_weights(root: torch.nn.Module, blocks: Sequence[torch.nn.Module], device: torch.device,
                  host_copies: bool = False) -> None:
    """Shard `root`'s weights over every rank: each of `blocks` (submodules of `root`, none inside another) as one
    unit, the rest of `root` as another. `device`: where the weights are (the rank's device). The model computes as
    before; each rank keeps about `1/size` of the weights between forwards. Parameters of another dtype than most
    (the small ones a model keeps in float32 beside bfloat16 weights: norms, modulation tables) stay whole on every
    rank: FSDP2 gathers one dtype per unit. `host_copies`: the shards stay in host memory (pinned on CUDA) and are
    copied to the device for each gather (FSDP2's CPU offload)."""
    if not is_initialized() or world_size() == 1:
        raise ValueError("sharding weights needs several ranks (a process group of more than one)")
    mesh = DeviceMesh.from_group(_group(), device_type=device.type)
    counts: dict[torch.dtype, int] = {}
    for parameter in root.parameters():
        counts[parameter.dtype] = counts.get(parameter.dtype, 0) + parameter.numel()
    main = max(counts, key=counts.get, default=None)
    whole = {parameter for parameter in root.parameters() if parameter.dtype != main}
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if host_copies else OffloadPolicy()
    for module in [*blocks, root]:
        own = type(module)
        fully_shard(module, mesh=mesh, reshard_after_forward=True, ignored_params=whole, offload_policy=offload)
        _keep_name(type(module), own)


def gather_ahead(block: torch.nn.Module) -> None:
    """Start all-gathering a sharded block's weights (asynchronously); its forward waits for them."""
    block.unshard(async_op=True)


def free_gathered(root: torch.nn.Module) -> None:
    """Free a sharded root's gathered weights (FSDP2 keeps a root's whole after forward, for a backward)."""
    root.reshard()


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


__all__ = ["free_gathered", "gather_ahead", "is_sharded", "local_rows", "resident_bytes", "shard_weights"]
