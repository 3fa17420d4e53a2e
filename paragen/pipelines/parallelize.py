"""`paragen.parallelize(pipe, config)`: the one entry point, for every supported diffusers pipeline."""
from __future__ import annotations

from paragen.parallel import ParallelConfig
from paragen.pipelines.dit import FAMILIES, parallelize_dit
from paragen.pipelines.hires import parallelize_hires
from paragen.pipelines.image import parallelize_unet
from paragen.pipelines.llm import parallelize_llm
from paragen.pipelines.llm_loading import SUPPORTED_LLMS
from paragen.pipelines.video import VIDEO_PIPELINES, parallelize_video

UNET_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def parallelize(pipe, config: ParallelConfig | None = None):
    """Make a diffusers pipeline run each request across all ranks, in place, and return it.

    Call `paragen.init()` first. Every rank builds the same pipeline (same weights) and calls it with
    the same arguments; each computes its share, and every rank returns the whole image. SD and SDXL
    are split into row bands (`patch`), PixArt, SD3 and Flux along the token sequence (`ulysses`,
    `ring`); both take `cfg=2` and the `displaced` mode. With `hires=HiresConfig(...)`, SD and SDXL go
    beyond their training size: training-size windows over the ranks, steered by a low-resolution view.
    TextToVideoSD and AnimateDiff split a video's frames into clips (`clip`), one per rank. A causal LM
    (Llama, Qwen2, Mistral) is sharded along the sequence (`seq`, `tp`) with a dense KV cache; use
    `parallelize_llm` to choose the KV store, and `model.paragen.new_cache()` for each request.
    """
    name = type(pipe).__name__
    if hasattr(pipe, "paragen"):
        raise ValueError("this pipeline is already parallelised")
    if config is not None and config.hires is not None:
        if name not in UNET_PIPELINES:
            raise TypeError(f"hires supports {', '.join(UNET_PIPELINES)}; got {name}")
        return parallelize_hires(pipe, config)
    if name in SUPPORTED_LLMS:
        parallelize_llm(pipe, config)
        return pipe
    if name in VIDEO_PIPELINES:
        return parallelize_video(pipe, config)
    if config is not None and config.clip > 1:
        raise TypeError(f"clip parallelism splits videos ({', '.join(VIDEO_PIPELINES)}); got {name}")
    if name in UNET_PIPELINES:
        return parallelize_unet(pipe, config)
    if name in FAMILIES:
        return parallelize_dit(pipe, config)
    supported = UNET_PIPELINES + tuple(FAMILIES) + VIDEO_PIPELINES + SUPPORTED_LLMS
    raise TypeError(f"paragen.parallelize supports {', '.join(supported)}; got {name}")
