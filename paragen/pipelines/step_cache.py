"""Step caching for a parallelised diffusion pipeline: each denoiser's cache plan, and the cache installed.

`enable_step_cache(pipe, StepCacheConfig(method="fbcache", threshold=0.1))`, after `paragen.parallelize`, makes every
denoiser of the pipeline (its UNet, or its transformers) run through one `StepCache` whose decisions every rank
shares (`paragen.parallel.step_cache`). A denoiser's cache plan is read from its structure, as data:
- a UNet (down blocks, a mid block, up blocks): DeepCache's cut (`features`);
- a diffusion transformer: its blocks, in the lists diffusers' own cache hooks walk and with the input/output
  positions diffusers registers for their classes (`diffusers.hooks._helpers.TransformerBlockRegistry`), the first
  the head (`residual`).
The step boundary is the scheduler's step, which every diffusers pipeline calls once per denoising step.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from paragen.parallel.components import DENOISERS
from paragen.parallel.intercept import intercept
from paragen.parallel.step_cache import BlockIO, CachePlan, StepCache, StepCacheConfig, install

# the ModuleLists of transformer blocks, as diffusers' cache hooks name them (`hooks._common`)
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers", "visual_transformer_blocks",
               "temporal_transformer_blocks")


def denoisers(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's denoisers by attribute name."""
    return {name: getattr(pipe, name) for name in DENOISERS if getattr(pipe, name, None) is not None}


# Blocks diffusers' cache hooks do not register, as data: (where the output puts the hidden states, where it puts a
# second stream that the block also carries and that argument's name; None: it returns the hidden states alone).
OWN_BLOCK_OUTPUTS: dict[str, tuple[int, int | None, str]] = {
    "SanaTransformerBlock": (0, None, ""),
    "Lumina2TransformerBlock": (0, None, ""),
    "AllegroTransformerBlock": (0, None, ""),
    "HunyuanDiTBlock": (0, None, ""),  # its long skips read earlier blocks' outputs: a served step runs none of them
    "HeliosTransformerBlock": (0, None, ""),
    "LTX2VideoTransformerBlock": (0, 1, "audio_hidden_states"),  # the video and the audio stream
    "AuraFlowJointTransformerBlock": (1, 0, "encoder_hidden_states"),
    "AuraFlowSingleTransformerBlock": (0, None, ""),
}
# Transformers whose last blocks take the text and image tokens joined into one sequence, the text first: what the
# body adds is split at the text's length into the two streams' residuals.
JOINED_TEXT_FIRST = ("Flux2Transformer2DModel", "AuraFlowTransformer2DModel")


def _block_io(block: torch.nn.Module) -> BlockIO:
    """Where a block takes and returns its streams: diffusers' registration of its class, else `OWN_BLOCK_OUTPUTS`."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    params = tuple(inspect.signature(type(block).forward).parameters)[1:]
    name = type(block).__name__
    if name in OWN_BLOCK_OUTPUTS:
        hidden, second, argument = OWN_BLOCK_OUTPUTS[name]
        return BlockIO(params, hidden, second, params[0], argument or "encoder_hidden_states")
    try:
        meta = TransformerBlockRegistry.get(type(block))
    except ValueError:
        raise ValueError(f"{name} is not a transformer block whose outputs paragen knows (diffusers' cache hooks' "
                         "registry, or paragen/pipelines/step_cache.py OWN_BLOCK_OUTPUTS): no step cache for this "
                         "model") from None
    hidden_arg = meta.hidden_states_argument_name  # a block that names it otherwise (Z-Image's `x`): its first
    return BlockIO(params, meta.return_hidden_states_index or 0, meta.return_encoder_hidden_states_index,
                   hidden_arg if hidden_arg in params else params[0], meta.encoder_hidden_states_argument_name)


def cache_plan(model: torch.nn.Module) -> CachePlan:
    """The cache plan of a UNet or diffusion transformer; ValueError for a model it cannot cut."""
    if all(hasattr(model, n) for n in ("down_blocks", "up_blocks", "mid_block")):
        downs, ups = len(model.down_blocks), len(model.up_blocks)
        if ups < 2:
            raise ValueError(f"{type(model).__name__} has fewer than two up blocks: no step cache for it")
        body = [f"down_blocks.{i}" for i in range(1, downs)] + (["mid_block"] if model.mid_block is not None else [])
        return CachePlan("features", "down_blocks.0", tuple(body + [f"up_blocks.{i}" for i in range(ups - 1)]))
    blocks = [f"{name}.{i}" for name, child in model.named_children()
              if name in BLOCK_LISTS and isinstance(child, torch.nn.ModuleList) for i in range(len(child))]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer block list ({', '.join(BLOCK_LISTS)}) and is no "
                         "UNet: no step cache for it")
    return CachePlan("residual", blocks[0], tuple(blocks[1:]),
                     {path: _block_io(model.get_submodule(path)) for path in blocks},
                     joined=type(model).__name__ in JOINED_TEXT_FIRST)


def enable_step_cache(pipe: Any, config: StepCacheConfig) -> StepCache | None:
    """Run `pipe`'s denoisers (parallelised already) through a step cache; each request's report says which steps
    were computed and which served, per rank. Returns the cache (None for `method="none"`)."""
    runtime = getattr(pipe, "paragen", None)
    if runtime is None:
        raise ValueError("enable_step_cache needs a pipeline parallelised by paragen.parallelize (one process is a "
                         "world of one)")
    if not config.enabled:
        return None
    if runtime.step_cache is not None:
        raise ValueError("this pipeline has a step cache already")
    runtime.check_step_cache(config)
    plans = {name: cache_plan(model) for name, model in denoisers(pipe).items()}
    cache = StepCache(config, runtime.mesh.group("world"), runtime.plan)
    for name, model in denoisers(pipe).items():
        install(model, plans[name], cache, name)

    def step_then_count(step, *args, **kwargs):
        output = step(*args, **kwargs)
        if runtime.in_request:
            cache.end_step()
        return output

    intercept(pipe.scheduler, "step", step_then_count, tag="step_cache")
    runtime.step_cache = cache
    return cache
