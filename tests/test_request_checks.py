"""The request checks `parallelize` runs before any collective (one process, no process group)."""
import inspect
from types import SimpleNamespace

import pytest
from diffusers import StableDiffusionPipeline

from paragen.comms import CommStats, GroupComm
from paragen.parallel import ParallelConfig
from paragen.parallel.patch import PatchContext
from paragen.pipelines.patch import ImageRuntime


def _runtime(cfg: int) -> ImageRuntime:
    comm = GroupComm(None, CommStats())
    mesh = SimpleNamespace(group=lambda name: comm)
    vae = SimpleNamespace(world=comm)  # a one-rank decode: the checks only read its size
    return ImageRuntime(ParallelConfig(cfg=cfg, patch=1), mesh, PatchContext(comm), vae, unet_factor=4)


def _call(*args, **kwargs) -> inspect.BoundArguments:
    pipe = SimpleNamespace(vae_scale_factor=8, unet=SimpleNamespace(config=SimpleNamespace(sample_size=16, time_cond_proj_dim=None)))
    bound = inspect.signature(StableDiffusionPipeline.__call__).bind(pipe, *args, **kwargs)
    _runtime(cfg=2).prepare_call(pipe, bound)
    return bound


def test_cfg2_accepts_the_pipelines_default_guidance():
    _call("a prompt", height=128, width=128)  # guidance_scale left at the pipeline's 7.5


def test_cfg2_refuses_guidance_off():
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        _call("a prompt", height=128, width=128, guidance_scale=1.0)


def test_size_and_steps_are_checked():
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        _call("a prompt", height=100, width=128)
    with pytest.raises(ValueError, match="num_inference_steps must be positive"):
        _call("a prompt", num_inference_steps=0)


def test_a_shared_generator_is_supplied_when_none_is_given():
    assert _call("a prompt", height=128, width=128).arguments["generator"] is not None
