"""Run several sequence-parallel layouts of the embedded DiT models on real ranks; rank 0 saves the results.

usage: dit_worker.py SPEC.json OUT.pt   (SPEC: a list of runs, see tests/test_dit_parallel.py)
Each run builds its pipeline afresh; a spec without parallel degrees runs unparallelised (the reference).
"""
import torch

import paragen
from paragen.comms import all_gather_objects
from paragen.pipelines.loading import load_pipeline
from tests.workers.specs import serve_specs


def generate(pipe, spec: dict) -> torch.Tensor:
    """The spec's image as a `[1, 3, H, W]` tensor (fixed prompt and seed)."""
    extra = {"use_resolution_binning": False} if spec["model"] == "tiny-pixart" else {}
    return pipe("a red fox in the snow", height=spec["size"], width=spec["size"], num_inference_steps=spec["steps"],
                guidance_scale=spec.get("guidance", 4.0), max_sequence_length=spec.get("text_tokens", 24),
                generator=torch.Generator().manual_seed(7), output_type="pt", **extra).images


def run(spec: dict) -> dict:
    pipe = load_pipeline(spec["model"])
    pipe.set_progress_bar_config(disable=True)
    if spec.get("parallel", True):
        config = paragen.ParallelConfig(cfg=spec.get("cfg", 1), ulysses=spec.get("ulysses", 1), ring=spec.get("ring"))
        paragen.parallelize(pipe, config, paragen.ExchangeConfig(mode=spec.get("mode", "sync"),
                                                                 warmup_steps=spec.get("warmup", 1)))
    image = generate(pipe, spec)
    result = {"image": image}
    if hasattr(pipe, "paragen"):
        result["stats"] = all_gather_objects(pipe.paragen.mesh.group("world"), pipe.paragen.stats.snapshot())
    return result


if __name__ == "__main__":
    serve_specs(run)
