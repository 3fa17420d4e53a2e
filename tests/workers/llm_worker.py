"""Run sequence-sharded causal-LM specs on real ranks; rank 0 saves the results.

usage: llm_worker.py SPEC.json OUT.pt   (SPEC: a list of runs, see tests/test_llm_parallel.py)
A `generate` spec runs `model.generate` through the sharded cache; a `ring` spec runs ring attention
on random shards and returns every rank's output; a `speculative` spec runs `generate_speculative` (and with
`caches`, returns every rank's full-cache K/V and the drafting rank's retrieval cache).
"""
import torch

import paragen
from paragen.comms import all_gather_objects
from paragen.parallel import ParallelMesh
from paragen.parallel.llm import KVConfig, cache_argument
from paragen.parallel.llm.config import SpeculativeConfig
from paragen.parallel.llm.ring import ring_causal_attention
from paragen.parallel.llm.shards import shard_bounds
from paragen.pipelines.llm import parallelize_llm
from paragen.pipelines.llm.loading import load_llm
from paragen.pipelines.llm.speculative import generate_speculative
from tests.workers.specs import serve_specs


def ring_inputs(seed: int, length: int) -> tuple[torch.Tensor, ...]:
    """The random q [1,4,L,16], k and v [1,2,L,16] of a `ring` spec (the test builds the same)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, length, 16, generator=g) for heads in (4, 2, 2))


def run_ring(spec: dict) -> dict:
    mesh = ParallelMesh(paragen.ParallelConfig(seq=paragen.world_size()), paragen.rank_device())
    comm = mesh.group("ring")
    bounds = shard_bounds(spec["length"], comm.size)
    start, end = bounds[comm.rank]
    q, k, v = (t[:, :, start:end] for t in ring_inputs(spec["seed"], spec["length"]))
    out = ring_causal_attention(q, k, v, comm, [b - a for a, b in bounds], 0.25)
    return {"parts": all_gather_objects(mesh.group("world"), out), "stats": mesh.stats.snapshot()}


def run_generate(spec: dict) -> dict:
    model = load_llm(spec["model"])
    config = paragen.ParallelConfig(seq=spec["seq"], tp=spec.get("tp", 1))
    kv = KVConfig(mode=spec.get("kv", "dense"), rank=spec.get("rank"), budget=spec.get("budget", 1 / 64))
    runtime = parallelize_llm(model, config, kv)
    ids = torch.tensor(spec["prompt"]).unsqueeze(0)
    cache = runtime.new_cache()
    torch.manual_seed(spec.get("seed", 0))
    sampling = {"do_sample": True, "top_k": None} if spec.get("sample") else {"do_sample": False, "top_k": None}
    out = model.generate(ids, **cache_argument(cache), max_new_tokens=spec["new_tokens"], top_p=None,
                         output_logits=True, return_dict_in_generate=True, **sampling)
    cache.close()
    return {"tokens": out.sequences[0, ids.shape[1]:], "logits": torch.stack(out.logits),
            "stats": runtime.mesh.stats.snapshot()}


SPECULATIVE_OPTIONS = ("gamma", "budget", "chunk", "sink", "recent", "refresh_every", "refresh_below", "draft_gamma",
                       "draft_sink", "draft_window", "full_cache", "host_block")


def run_speculative(spec: dict) -> dict:
    model = load_llm(spec["model"])
    options = SpeculativeConfig(**{k: spec[k] for k in SPECULATIVE_OPTIONS if k in spec})
    runtime = parallelize_llm(model, paragen.ParallelConfig(seq=spec["seq"]), KVConfig(mode="speculative",
                                                                                      speculative=options))
    draft = load_llm(spec["draft"], seed=spec.get("draft_seed", 0)) if spec.get("draft") else None
    ids = torch.tensor(spec["prompt"]).unsqueeze(0)
    out = generate_speculative(model, ids, max_new_tokens=spec["new_tokens"], do_sample=spec.get("sample", False),
                               temperature=spec.get("temperature", 1.0), top_p=spec.get("top_p", 1.0),
                               seed=spec.get("seed", 0), draft_model=draft)
    result = {"tokens": out.sequences[0, ids.shape[1]:], "stats": out.stats.report(),
              "comm": runtime.mesh.stats.snapshot(),
              "kv": {"device_bytes": out.cache.device_bytes(), "host_bytes": out.cache.host_bytes(),
                     "fetched_bytes": out.cache.fetched_bytes()}}
    if spec.get("caches"):
        held = [tuple(t.clone() for t in store.tokens()) for store in out.cache.stores]
        result["full"] = all_gather_objects(runtime.mesh.group("world"), held)
        result["retrieval"] = [store.tokens() for store in out.retrieval.stores] if out.retrieval else None
    return result


def run(spec: dict) -> dict:
    kinds = {"ring": run_ring, "generate": run_generate, "speculative": run_speculative}
    return kinds[spec["kind"]](spec)


if __name__ == "__main__":
    serve_specs(run)
