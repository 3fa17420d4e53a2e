"""Layer-wise offload (`--offload-layers`): a component's blocks kept in host memory (pinned on CUDA) and copied
onto the device just before they run, the next block's copy in flight on a side stream while the block computes
(the same overlap rule as the KV cache's host tier, `kernels.chunk_fetch`); a block's device copy is freed once it
has run. The rest of the component (its root: embeddings, norms, projections) stays on the device. The blocks are
the units weight sharding gathers (`weights.weight_units`), and the next block is the one the first forward ran
next (`BlockOrder`). With `--shard-weights` the shards stay in host memory instead (FSDP2's CPU offload), each
block gathered on the device as it runs.

On the CPU, host memory is the device's: the blocks' weights are released after each block and brought back before
it the same way, but nothing moves.
"""
from __future__ import annotations

from typing import Any

import torch

from paragen.kernels.chunk_fetch import ChunkFetcher, to_host
from paragen.parallel.block_order import BlockOrder
from paragen.parallel.weights import ORDER_ATTRIBUTE, SHARDED_COMPONENTS, weight_units


class HostBlock:
    """One block's parameters in host memory, one flat buffer per dtype, brought onto the device on demand."""

    def __init__(self, block: torch.nn.Module, fetcher: ChunkFetcher, device: torch.device) -> None:
        self.fetcher, self.device = fetcher, device
        self.parameters = list(block.parameters())
        self.shapes = [p.shape for p in self.parameters]
        self.host: dict[torch.dtype, torch.Tensor] = {}
        for dtype in dict.fromkeys(p.dtype for p in self.parameters):
            flat = torch.cat([p.detach().reshape(-1) for p in self.parameters if p.dtype == dtype])
            self.host[dtype] = to_host(flat) if device.type == "cuda" else flat
        self._pending: dict[torch.dtype, Any] | None = None
        self.present = True
        self.release()
        block.register_forward_pre_hook(lambda module, args: self.bring())
        block.register_forward_hook(lambda module, args, output: self.release())

    def start(self) -> None:
        """Begin copying the block's weights to the device (no-op while they are there or on their way)."""
        if not self.present and self._pending is None:
            self._pending = {dtype: self.fetcher.start_whole(host) for dtype, host in self.host.items()}

    def bring(self) -> None:
        """Have the block's weights on the device (waiting for a copy started earlier)."""
        if self.present:
            return
        self.start()
        flats = {dtype: self.fetcher.wait(pending) for dtype, pending in self._pending.items()}
        offsets = dict.fromkeys(flats, 0)
        for parameter, shape in zip(self.parameters, self.shapes):
            first, count = offsets[parameter.dtype], shape.numel()
            parameter.data = flats[parameter.dtype][first:first + count].view(shape)
            offsets[parameter.dtype] = first + count
        self._pending, self.present = None, True

    def release(self) -> None:
        """Drop the block's device copy (the host copy stays)."""
        for parameter in self.parameters:
            parameter.data = torch.empty(0, dtype=parameter.dtype, device=self.device)
        self.present = False


def offload_component(model: torch.nn.Module, device: torch.device, fetcher: ChunkFetcher) -> None:
    """Keep `model`'s blocks in host memory, each brought onto `device` just before it runs (the next one's copy
    started as a block starts); the model's other weights are left where they are."""
    units = weight_units(model)
    blocks = {id(unit): HostBlock(unit, fetcher, device) for unit in units}  # kept alive by their hooks
    setattr(model, ORDER_ATTRIBUTE, BlockOrder(model, units, ahead=lambda unit: blocks[id(unit)].start()))


def offload_pipeline_layers(pipe: Any, device: torch.device) -> None:
    """`offload_component` for every present component of `SHARDED_COMPONENTS` (one copying thread for all)."""
    fetcher = ChunkFetcher(device)
    for name in SHARDED_COMPONENTS:
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            offload_component(getattr(pipe, name), device, fetcher)


__all__ = ["HostBlock", "offload_component", "offload_pipeline_layers"]
