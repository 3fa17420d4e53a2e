"""paragen: one generation request, many ranks.

    import paragen
    paragen.init()                                   # torchrun, srun, mpirun or a single process
    pipe = StableDiffusionXLPipeline.from_pretrained(...)
    paragen.parallelize(pipe, paragen.ParallelConfig(patch=2, cfg=2, mode="displaced"))
    image = pipe(prompt, height=2048, width=2048, generator=torch.Generator().manual_seed(0)).images[0]
    if paragen.is_output_rank():
        image.save("out.png")
    paragen.shutdown()
"""
from typing import Any

from paragen.comms import is_output_rank, world_size
from paragen.launch.process_group import init, shutdown
from paragen.parallel import HiresConfig, ParallelConfig, TemporalAttention

__all__ = ["HiresConfig", "ParallelConfig", "TemporalAttention", "init", "is_output_rank", "parallelize", "shutdown",
           "world_size"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `parallelize` imports diffusers (seconds); load it on first use so launch-only code stays fast.
    if name == "parallelize":
        from paragen.pipelines.parallelize import parallelize

        return parallelize
    raise AttributeError(f"module 'paragen' has no attribute {name!r}")
