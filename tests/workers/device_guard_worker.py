"""Run each workload's parallel path on real ranks under `DeviceGuard`; rank 0 saves every rank's findings.

usage: device_guard_worker.py SPEC.json OUT.pt   (SPEC: a list of runs, see tests/test_device_guard.py)
"""
import torch

import paragen
from paragen.comms import all_gather_objects
from paragen.parallel.clip import TemporalAttention
from paragen.parallel.llm import KVConfig, cache_argument
from paragen.pipelines.llm import parallelize_llm
from paragen.pipelines.llm.loading import load_llm
from paragen.pipelines.loading import load_pipeline
from tests.device_guard import DeviceGuard
from tests.workers.specs import serve_specs

SEED = 3


def _image(spec: dict):
    pipe = load_pipeline(spec["model"], device=paragen.rank_device())
    pipe.set_progress_bar_config(disable=True)
    hires = paragen.HiresConfig(window=16, stride=8, guidance=spec["guidance"]) if "guidance" in spec else None
    config = paragen.ParallelConfig(cfg=spec.get("cfg", 1), ulysses=spec.get("ulysses", 1), ring=spec.get("ring"))
    paragen.parallelize(pipe, config, hires or paragen.ExchangeConfig(mode=spec.get("mode", "sync"), warmup_steps=1))
    extra = {"use_resolution_binning": False, "max_sequence_length": 24} if spec["model"] == "tiny-pixart" else {}
    seeded = {} if spec.get("shared_seed") else {"generator": torch.Generator().manual_seed(SEED)}
    pipe("a red fox", height=spec["height"], width=spec["width"], num_inference_steps=3, output_type="pt",
         **seeded, **extra)
    return pipe.paragen.mesh


def _video(spec: dict):
    pipe = load_pipeline(spec["model"], device=paragen.rank_device())
    pipe.set_progress_bar_config(disable=True)
    temporal = TemporalAttention(scope=spec["scope"], local=4, global_frames=4)
    paragen.parallelize(pipe, paragen.ParallelConfig(clip=paragen.world_size()), temporal)
    pipe(prompt="a boat", num_frames=spec.get("frames", 12), height=64, width=64, num_inference_steps=2,
         generator=torch.Generator().manual_seed(SEED), output_type="np")
    return pipe.paragen.mesh


def _llm(spec: dict):
    model = load_llm("tiny-llama", device=paragen.rank_device())
    kv = KVConfig(mode=spec["kv"], budget=0.25)
    runtime = parallelize_llm(model, paragen.ParallelConfig(seq=paragen.world_size()), kv)
    ids = torch.randint(3, 92, (1, 200), generator=torch.Generator().manual_seed(SEED)).to(paragen.rank_device())
    cache = runtime.new_cache()
    try:
        model.generate(ids, **cache_argument(cache), max_new_tokens=3, do_sample=False, top_k=None, top_p=None)
    finally:
        cache.close()
    return runtime.mesh


RUNS = {"image": _image, "video": _video, "llm": _llm}


def run(spec: dict) -> dict:
    guard = DeviceGuard()
    with guard:
        mesh = RUNS[spec["kind"]](spec)
    return {"sites": all_gather_objects(mesh.group("world"), dict(guard.sites))}


if __name__ == "__main__":
    serve_specs(run)
