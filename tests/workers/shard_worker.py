"""Run a model twice on the same ranks, its weights whole and then sharded (`--shard-weights`) and/or offloaded
(`--offload-layers`: spec keys `shard`, default true, and `offload`); rank 0 saves both outputs, the denoiser's
parameter bytes on the device of every rank in each run, and the prefetches the second run made.

usage: shard_worker.py SPEC.json OUT.pt   (SPEC: a list of runs, see tests/test_weight_shards.py)
A spec names an embedded `model` or a local `checkpoint` folder, its degrees, `mode` or `scope`, `dtype` and `call`.
"""
import torch

import paragen
from paragen.comms import all_gather_objects, world_comm
from paragen.comms.weight_shards import resident_bytes
from paragen.parallel.weights import block_order
from paragen.pipelines.loading import LOADED, build_pipeline
from tests.workers.specs import serve_specs


def _options(spec: dict):
    if "mode" in spec:
        return paragen.ExchangeConfig(mode=spec["mode"], warmup_steps=1)
    if "scope" in spec:
        return paragen.TemporalAttention(scope=spec["scope"])
    return None


def _once(spec: dict, shard: bool, offload: bool) -> tuple[torch.Tensor, list[int], int, dict[str, str]]:
    dtype = getattr(torch, spec.get("dtype", "float32"))
    # the job's order: a local checkpoint is read sharded, then the workload installed
    pipe = build_pipeline(spec.get("checkpoint") or spec["model"], dtype=dtype, shard_weights=shard,
                          offload_layers=offload, read_once=True)  # whole weights: read by rank 0, sent (as on CUDA)
    pipe.set_progress_bar_config(disable=True)
    config = paragen.ParallelConfig(**{d: spec[d] for d in ("cfg", "clip", "patch", "ulysses", "ring") if d in spec})
    paragen.parallelize(pipe, config, _options(spec))
    out = pipe(prompt="a red fox in the snow", num_inference_steps=2, generator=torch.Generator().manual_seed(7),
               output_type="pt", **spec["call"])
    out = out.frames if hasattr(out, "frames") else out.images
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    held = all_gather_objects(world_comm(), resident_bytes(denoiser))
    record = block_order(denoiser)
    loaded = {name: getattr(part, LOADED, "read whole") for name, part in pipe.components.items()
              if isinstance(part, torch.nn.Module)}
    return out.float(), held, 0 if record is None else record.prefetches, loaded


def run(spec: dict) -> dict:
    whole, whole_bytes, _, whole_loaded = _once(spec, False, False)
    sharded, sharded_bytes, prefetches, loaded = _once(spec, spec.get("shard", True), spec.get("offload", False))
    return {"whole": whole, "sharded": sharded, "whole_bytes": whole_bytes, "sharded_bytes": sharded_bytes,
            "prefetches": prefetches, "whole_loaded": whole_loaded, "loaded": loaded}


if __name__ == "__main__":
    serve_specs(run)
