"""How many parameters a diffusers model's components hold, counted from their configs without reading a weight
(each component is built on torch's `meta` device), and how many one rank holds, whole or with `--shard-weights`.

With sharded weights a rank holds its shard of every sharded component (`parallel.weights.SHARDED_COMPONENTS`)
and, while one of them runs, that component's parameters outside its units (gathered for its whole forward) and
two of its units (the block running and the next one, prefetched). With offloaded layers, the same but no shards on
the device. The other components (the VAE) stay whole.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from paragen.log import warn_once
from paragen.parallel.weights import SHARDED_COMPONENTS, weight_units
from paragen.pipelines.loading import build_empty, component_class, model_components, model_folder


@dataclass(frozen=True)
class WeightSizes:
    """A model's parameters as the ranks hold them."""

    whole: int  # parameters every rank holds whole (the components that are never sharded)
    sharded: int  # parameters of the components `--shard-weights` shards
    gathered: int  # the most parameters beyond its shards a rank holds whole at once when sharded

    def per_rank(self, ranks: int, shard: bool, offload: bool = False) -> int:
        """The most parameters one rank of `ranks` holds on its device at once, with its weights sharded or not,
        offloaded to host memory or not."""
        gathered = min(self.gathered, self.sharded)
        if offload:
            return self.whole + gathered
        if not shard or ranks == 1:
            return self.whole + self.sharded
        return self.whole + math.ceil(self.sharded / ranks) + gathered


def _count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@functools.lru_cache(maxsize=16)
def weight_sizes(model: str) -> WeightSizes | None:
    """The parameters of an embedded or local diffusers model's components; None where a component cannot be built
    from its config (the estimate then leaves the weights out, and says so)."""
    root = model_folder(model)
    whole = sharded = gathered = 0
    try:
        for name, spec in model_components(model).items():
            if spec is None or not (root / name / "config.json").is_file():
                continue  # left out, or no weights (scheduler, tokenizer)
            if not issubclass(component_class(*spec), torch.nn.Module):
                continue
            module = build_empty(spec[0], spec[1], root / name, buffers=True)
            total = _count(module)
            if name not in SHARDED_COMPONENTS:
                whole += total
                continue
            units = sorted((_count(unit) for unit in weight_units(module)), reverse=True)
            sharded += total
            gathered = max(gathered, total - sum(units) + sum(units[:2]))
    except Exception as error:  # noqa: BLE001 - any library's failure to build a config means "not counted"
        warn_once(f"the weights of {model} are not counted in its memory estimate: {type(error).__name__}: {error}")
        return None
    return WeightSizes(whole, sharded, gathered)


__all__ = ["WeightSizes", "weight_sizes"]
