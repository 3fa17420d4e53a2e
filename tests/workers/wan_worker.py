"""Run several clip and sequence-parallel layouts of the embedded tiny-wan on real ranks; rank 0 saves the results.

usage: wan_worker.py SPEC.json OUT.pt   (SPEC: a list of runs, see tests/test_wan_parallel.py)
Each run builds its pipeline afresh; a spec without parallel degrees runs unparallelised (the reference).
A spec with "expect_error" must be refused with a ValueError on every rank; its result is the message.
A spec with "vae_frames" decodes a fixed random latent of that many frames through the parallelised VAE.
"""
import torch

import paragen
from paragen.comms import all_gather_objects, world_comm
from paragen.pipelines.loading import load_pipeline
from tests.workers.specs import serve_specs


PROMPT = "a red fox running through snow"


def generate(pipe, spec: dict) -> torch.Tensor:
    """The spec's video as a `[1, F, 3, H, W]` tensor (fixed prompt, or the spec's segment prompts, and seed)."""
    text = {"segment_prompts": spec["segments"]} if "segments" in spec else {"prompt": PROMPT}
    return pipe(**text, negative_prompt="blurry", num_frames=spec["frames"],
                height=spec["height"], width=spec["width"], num_inference_steps=spec["steps"],
                guidance_scale=spec.get("guidance", 5.0), max_sequence_length=24,
                generator=torch.Generator().manual_seed(11), output_type="pt").frames


def latent(frames: int) -> torch.Tensor:
    """A fixed random latent video `[1, 16, frames, 6, 10]` (tiny-wan's VAE: 16 channels, 8x spatial)."""
    return torch.randn(1, 16, frames, 6, 10, generator=torch.Generator().manual_seed(frames))


def run(spec: dict) -> dict:
    pipe = load_pipeline(spec.get("model", "tiny-wan"))
    pipe.set_progress_bar_config(disable=True)
    config = paragen.ParallelConfig(cfg=spec.get("cfg", 1), clip=spec.get("clip", 1), ulysses=spec.get("ulysses", 1),
                                    ring=spec.get("ring"))
    temporal = paragen.TemporalAttention(scope=spec.get("scope", "dual"), local=spec.get("local", 2),
                                         global_frames=spec.get("global_frames", 3), bias=spec.get("bias"),
                                         overlap=spec.get("overlap", True))
    try:
        paragen.parallelize(pipe, config, temporal)
        if "vae_frames" in spec:
            decoded = pipe.vae.decode(latent(spec["vae_frames"]), return_dict=False)[0]
            stats = all_gather_objects(pipe.paragen.mesh.group("world"), pipe.paragen.stats.snapshot())
            return {"decoded": decoded, "stats": stats}
        video = generate(pipe, spec)
    except ValueError as error:
        if not spec.get("expect_error"):
            raise
        return {"error": all_gather_objects(world_comm(), str(error))}
    if spec.get("expect_error"):
        raise AssertionError(f"{spec['name']}: no error")
    stats = all_gather_objects(pipe.paragen.mesh.group("world"), pipe.paragen.stats.snapshot())
    return {"video": video, "stats": stats, "steps": len(pipe.paragen.step_seconds)}


if __name__ == "__main__":
    serve_specs(run)
