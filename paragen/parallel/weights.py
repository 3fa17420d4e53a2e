"""Which weights of a pipeline are sharded over the ranks (`--shard-weights`), and in which units.

The components sharded are the denoisers and the text encoders (`SHARDED_COMPONENTS`): together nearly all of a
generation model's weights. The VAE stays whole on every rank (each rank decodes its own rows or frames with it, and
it is small).

A unit is a block the libraries themselves say must stay whole on one device: the classes a diffusers or transformers
model lists in `_no_split_modules` (a UNet's resnet and transformer blocks, a DiT's transformer blocks, a
T5 encoder's blocks), the innermost where they nest. A model that lists none (LTX-Video, Allegro, HunyuanDiT, the UNet video
models) is cut into the items of its top-level module lists (`transformer_blocks`, `down_blocks`, …). What is left
outside the units (embeddings, final norms and projections) is one more unit, the model's root.
"""
from __future__ import annotations

from typing import Any

import torch

from paragen.comms import rank_device
from paragen.comms.weight_shards import free_gathered, gather_ahead, is_sharded, shard_weights
from paragen.parallel.block_order import BlockOrder
from paragen.parallel.components import MODELS

ORDER_ATTRIBUTE = "paragen_block_order"
SHARDED_COMPONENTS = MODELS  # the denoisers and the text encoders


def weight_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of `model` sharded as units, in module order: the innermost of the declared ones (a UNet's resnet
    and transformer blocks, not the up blocks around them), so that a unit gathered whole is small."""
    declared = set(getattr(model, "_no_split_modules", None) or ())
    found = [(name, module) for name, module in model.named_modules() if name and type(module).__name__ in declared]
    units = [module for name, module in found if not any(other.startswith(f"{name}.") for other, _ in found)]
    if units:
        return units
    return [block for child in model.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def shard_component(model: torch.nn.Module, device: torch.device, host_copies: bool = False) -> BlockOrder:
    """Shard one component's weights over all ranks, in place, by its `weight_units`; each block starts gathering
    the next one's (`BlockOrder`). `host_copies`: the shards stay in host memory (`--offload-layers`)."""
    units = weight_units(model)
    shard_weights(model, units, device, host_copies)
    order = BlockOrder(model, units, ahead=gather_ahead, after=lambda: free_gathered(model))
    setattr(model, ORDER_ATTRIBUTE, order)
    return order


def shard_pipeline_weights(pipe: Any, device: torch.device | None = None, host_copies: bool = False) -> None:
    """Shard every present component of `SHARDED_COMPONENTS` of a diffusers pipeline over all ranks, in place (those
    loaded sharded already stay as they are); each rank's shards go to `device` (default: the rank's), or stay in
    host memory with `host_copies`."""
    for name in SHARDED_COMPONENTS:
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module) and not is_sharded(model):
            shard_component(model, device or rank_device(), host_copies)


def block_order(model: torch.nn.Module) -> BlockOrder | None:
    """How a component sharded (`shard_component`) or offloaded (`paragen.parallel.offload`) brings its blocks in:
    their order, its prefetches; None for a component that is neither."""
    return getattr(model, ORDER_ATTRIBUTE, None)


__all__ = ["SHARDED_COMPONENTS", "shard_component", "shard_pipeline_weights", "block_order", "weight_units"]
