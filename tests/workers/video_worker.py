"""Run clip-parallel layouts of the embedded video models on real ranks; rank 0 saves the results.

usage: video_worker.py SPEC.json OUT.pt   (SPEC: a list of runs, see tests/test_video_parallel.py)
"""
import torch

import paragen
from paragen.parallel.clip import TemporalAttention
from paragen.pipelines.loading import load_pipeline
from tests.workers.specs import serve_specs


def run(spec: dict) -> dict:
    pipe = load_pipeline(spec["model"])
    pipe.set_progress_bar_config(disable=True)
    temporal = TemporalAttention(scope=spec["scope"], local=spec["local"], global_frames=spec["global_frames"],
                                 bias_switch=spec["switch"], overlap=spec.get("overlap", True))
    paragen.parallelize(pipe, paragen.ParallelConfig(clip=paragen.world_size()), temporal)
    prompts = {"segment_prompts": spec["segments"]} if "segments" in spec else {"prompt": spec["prompt"]}
    frames = pipe(num_frames=spec["frames"], height=spec["size"], width=spec["size"], num_inference_steps=spec["steps"],
                  generator=torch.Generator().manual_seed(spec["seed"]), output_type="np", **prompts).frames
    return {"frames": torch.from_numpy(frames), "stats": pipe.paragen.stats.snapshot()}


if __name__ == "__main__":
    serve_specs(run)
