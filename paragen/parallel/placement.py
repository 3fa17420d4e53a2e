"""Where a pipeline's denoiser and text-encoder weights live: whole on every rank's device (the default), sharded
over the ranks (`--shard-weights`, `weights`), block by block from host memory (`--offload-layers`, `offload`), or
both (the shards in host memory)."""
from __future__ import annotations

from typing import Any

import torch

from paragen.parallel.offload import offload_pipeline_layers
from paragen.parallel.weights import shard_pipeline_weights


def place_pipeline_weights(pipe: Any, device: torch.device, shard: bool, offload: bool) -> None:
    """Shard and/or offload `pipe`'s `SHARDED_COMPONENTS` in place; `device`: the rank's."""
    if shard:
        shard_pipeline_weights(pipe, device, host_copies=offload)
    elif offload:
        offload_pipeline_layers(pipe, device)


__all__ = ["place_pipeline_weights"]
