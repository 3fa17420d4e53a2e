"""Generate with a sequence-sharded causal LM on real ranks; rank 0 saves the results.

usage: llm_worker.py SPEC.json OUT.pt   (SPEC: a list of runs, see tests/test_llm_parallel.py)
"""
import torch

import paragen
from paragen.parallel.llm import KVConfig
from paragen.pipelines.llm import parallelize_llm
from paragen.pipelines.llm_loading import load_llm
from tests.workers.specs import serve_specs


def run(spec: dict) -> dict:
    model = load_llm(spec["model"])
    config = paragen.ParallelConfig(seq=spec["seq"], tp=spec.get("tp", 1))
    kv = KVConfig(mode=spec.get("kv", "dense"), rank=spec.get("rank"), budget=spec.get("budget", 1 / 64))
    runtime = parallelize_llm(model, config, kv)
    ids = torch.tensor(spec["prompt"]).unsqueeze(0)
    cache = runtime.new_cache()
    torch.manual_seed(spec.get("seed", 0))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=spec["new_tokens"], do_sample=spec.get("sample", False),
                         top_k=None, top_p=None, output_logits=True, return_dict_in_generate=True)
    cache.close()
    return {"tokens": out.sequences[0, ids.shape[1]:], "logits": torch.stack(out.logits),
            "stats": runtime.mesh.stats.snapshot()}


if __name__ == "__main__":
    serve_specs(run)
