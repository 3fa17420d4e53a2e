"""Run the step cache in parallel layouts of the embedded models on real ranks; rank 0 saves the results.

usage: cache_worker.py SPEC.json OUT.pt   (SPEC: a list of runs, see tests/test_step_cache_parallel.py)
A run: "model", its "kind" (image, hires, video), degrees, "mode"/"scope", and "cache" (StepCacheConfig fields, or
none). Its result: the output tensor and every rank's record of the cache (which steps it computed and served).
"""
import torch

import paragen
from paragen.comms import all_gather_objects
from paragen.pipelines.loading import load_pipeline
from tests.workers.specs import serve_specs

PROMPT = "a red fox in the snow"


def _options(spec: dict):
    if spec["kind"] == "hires":
        return paragen.HiresConfig(window=16, stride=8, guidance="sync", guidance_weight=0.6, structure_fraction=0.25)
    if spec["kind"] == "video":
        return paragen.TemporalAttention(scope="full")
    return paragen.ExchangeConfig(mode=spec.get("mode", "sync"), warmup_steps=spec.get("warmup", 1))


def _generate(pipe, spec: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    if spec["kind"] == "video":
        extra = {"max_sequence_length": 24, "negative_prompt": "blurry"} if spec["model"] == "tiny-wan" else {}
        return torch.as_tensor(pipe(PROMPT, num_frames=spec["frames"], height=spec["size"], width=spec["size"],
                                    num_inference_steps=spec["steps"], generator=generator, output_type="pt",
                                    **extra).frames)
    extra = {"use_resolution_binning": False} if spec["model"] == "tiny-pixart" else {}
    height, width = (192, 256) if spec["kind"] == "hires" else (spec["size"], spec["size"])
    return pipe(PROMPT, height=height, width=width, num_inference_steps=spec["steps"], guidance_scale=5.0,
                generator=generator, output_type="pt", **extra).images


def run(spec: dict) -> dict:
    pipe = load_pipeline(spec["model"])
    pipe.set_progress_bar_config(disable=True)
    config = paragen.ParallelConfig(**spec.get("degrees", {}))
    paragen.parallelize(pipe, config, _options(spec))
    cache = paragen.enable_step_cache(pipe, paragen.StepCacheConfig(**spec["cache"])) if spec.get("cache") else None
    out = _generate(pipe, spec)
    records = all_gather_objects(pipe.paragen.mesh.group("world"), None if cache is None else cache.last)
    return {"out": out, "records": records}


if __name__ == "__main__":
    serve_specs(run)
