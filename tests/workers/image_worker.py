"""Run several parallel layouts of the embedded image models on real ranks; rank 0 saves the results.

usage: image_worker.py SPEC.json OUT.pt   (SPEC: a list of runs, see tests/test_image_parallel.py)
"""
import torch

import paragen
from paragen.comms import all_gather_objects
from paragen.pipelines.loading import load_pipeline
from tests.workers.specs import serve_specs


def run(spec: dict) -> dict:
    pipe = load_pipeline(spec["model"])
    pipe.set_progress_bar_config(disable=True)
    exchange = paragen.ExchangeConfig(mode=spec.get("mode", "sync"), warmup_steps=spec.get("warmup", 1),
                                      partial_fraction=spec.get("fraction", 0.3))
    paragen.parallelize(pipe, paragen.ParallelConfig(cfg=spec.get("cfg", 1)), exchange)
    image = pipe("a red fox in the snow", height=spec["size"], width=spec["size"], num_inference_steps=spec["steps"],
                 guidance_scale=5.0, generator=torch.Generator().manual_seed(7), output_type="pt").images
    stats = all_gather_objects(pipe.paragen.mesh.group("world"), pipe.paragen.stats.snapshot())
    result = {"image": image, "stats": stats}
    if spec.get("decode"):  # the parallel VAE decode alone, on a fixed latent
        latent = torch.randn(1, 4, spec["size"] // 8, spec["size"] // 8, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            result["decoded"] = pipe.vae.decode(latent).sample
    return result


if __name__ == "__main__":
    serve_specs(run)
