"""Run hires layouts of the embedded image models on real ranks; rank 0 saves the results.

usage: hires_worker.py SPEC.json OUT.pt   (SPEC: a list of runs, see tests/test_hires_parallel.py)
"""
import torch

import paragen
from paragen.pipelines.loading import load_pipeline
from tests.workers.specs import serve_specs


def run(spec: dict) -> dict:
    pipe = load_pipeline(spec["model"])
    pipe.set_progress_bar_config(disable=True)
    hires = paragen.HiresConfig(window=spec["window"], stride=spec["stride"], guidance=spec["guidance"],
                                guidance_weight=spec["w0"], guidance_decay=spec["decay"],
                                structure_fraction=spec["fraction"], placement=spec.get("placement", "interleaved"),
                                window_batch=spec.get("window_batch", 1))
    paragen.parallelize(pipe, paragen.ParallelConfig(), hires)
    image = pipe(spec["prompt"], height=spec["height"], width=spec["width"], num_inference_steps=spec["steps"],
                 guidance_scale=spec["guidance_scale"], generator=torch.Generator().manual_seed(spec["seed"]),
                 output_type="pt").images
    runtime = pipe.paragen
    return {"image": image, "trace": runtime.trace, "seed_step": runtime.seed_step,
            "loads": [runtime.layout.assignment.load(r) for r in range(runtime.comm.size)]}


if __name__ == "__main__":
    serve_specs(run)
