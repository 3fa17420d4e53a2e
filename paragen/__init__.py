"""paragen: one generation request, many ranks.

    import paragen
    paragen.init()                                   # torchrun, srun, mpirun or a single process
    pipe = StableDiffusionXLPipeline.from_pretrained(...)
    paragen.parallelize(pipe, paragen.ParallelConfig(patch=2, cfg=2), paragen.ExchangeConfig(mode="displaced"))
    image = pipe(prompt, height=2048, width=2048, generator=torch.Generator().manual_seed(0)).images[0]
    if paragen.is_output_rank():
        image.save("out.png")
    paragen.shutdown()

Step caching (First-Block Cache, TeaCache, TaylorSeer), with every rank skipping the same steps:
`paragen.enable_step_cache(pipe, paragen.StepCacheConfig(method="fbcache", threshold=0.1))` after `parallelize`.

A model larger than one GPU: `paragen.parallelize(pipe, config, options, shard_weights=True)` shards the denoisers'
and text encoders' weights over the ranks (FSDP2); `offload_layers=True` keeps their blocks in host memory.

Causal LMs (Llama, Qwen2, Mistral) take `paragen.parallelize_llm(model, ParallelConfig(seq=N, tp=M),
KVConfig(mode="offload"))` and generate with `model.generate(ids, **paragen.cache_argument(runtime.new_cache()))`
(`cache=` on transformers ≥ 5.24, `past_key_values=` before; `cache_argument` picks the installed one's).
Lossless speculative decoding (TriForce): `KVConfig(mode="speculative", speculative=SpeculativeConfig(...))`,
then `paragen.generate_speculative(model, ids, max_new_tokens=..., do_sample=..., draft_model=...)`.
"""
from typing import Any

from paragen.comms import is_output_rank, rank_device, world_size
from paragen.launch.process_group import init, shutdown
from paragen.parallel import ExchangeConfig, HiresConfig, ParallelConfig, TemporalAttention
from paragen.parallel.llm.config import KVConfig, SpeculativeConfig
from paragen.parallel.step_cache import StepCacheConfig

__all__ = ["ExchangeConfig", "HiresConfig", "JobRunner", "KVConfig", "ParallelConfig", "SpeculativeConfig",
           "StepCacheConfig", "TemporalAttention", "cache_argument", "enable_step_cache", "generate_speculative", "init",
           "is_output_rank", "parallelize", "parallelize_llm", "rank_device", "shutdown", "world_size"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The workloads import diffusers/transformers (seconds): load them on first use so launch-only code stays fast.
    if name == "parallelize":
        from paragen.pipelines.registry import parallelize

        return parallelize
    if name == "enable_step_cache":
        from paragen.pipelines.step_cache import enable_step_cache

        return enable_step_cache
    if name == "parallelize_llm":
        from paragen.pipelines.llm import parallelize_llm

        return parallelize_llm
    if name == "generate_speculative":
        from paragen.pipelines.llm.speculative import generate_speculative

        return generate_speculative
    if name == "JobRunner":
        from paragen.launch.runner import JobRunner

        return JobRunner
    if name == "cache_argument":
        from paragen.parallel.llm.cache import cache_argument

        return cache_argument
    raise AttributeError(f"module 'paragen' has no attribute {name!r}")
