"""`parallelize(pipe, config)`: a stock diffusers SD / SDXL pipeline, parallel in place.

What changes, and how (no diffusers model code is forked):
- UNet: convs, group norms and attention processors become patch-parallel (`patching.py`). A forward
  pre-hook gives each rank its CFG branch (batch half) and its row band of the latent; a forward
  hook all-gathers the bands' noise predictions so every rank holds the full, identical latent and the
  pipeline's own loop and scheduler run unchanged.
- VAE decoder: split into bands over *all* ranks, exact (halo convs, gathered GroupNorm statistics,
  gathered K/V in the mid-block attention); the image is all-gathered at the end.
- `pipe(...)`: the call is wrapped (the instance gets a subclass with the same name) to check the
  request before any collective, give every rank the same random generator when the user passed
  none, and mark the request's start and end for the step plan (warm-up, stale steps).
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from paragen.comms import broadcast_int
from paragen.parallel import ParallelConfig, ParallelMesh
from paragen.parallel.partition import band_bounds, check_image_size
from paragen.parallel.patch import PatchContext
from paragen.pipelines.patching import patch_modules

SUPPORTED_PIPELINES = (StableDiffusionPipeline, StableDiffusionXLPipeline)
# UNet keyword arguments whose first dimension is the batch (split between the CFG branches).
_BATCHED_KWARGS = ("encoder_hidden_states", "timestep_cond", "class_labels", "encoder_attention_mask")
# UNet keyword arguments carrying spatial residuals (ControlNet, T2I-Adapter): not band-aware yet.
_SPATIAL_KWARGS = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals")


@dataclass
class ImageRuntime:
    """What `parallelize` attaches to the pipeline as `pipe.paragen`."""

    config: ParallelConfig
    mesh: ParallelMesh
    unet_ctx: PatchContext
    vae_ctx: PatchContext
    unet_factor: int
    step_seconds: list[float] = field(default_factory=list)
    in_request: bool = False
    _step_start: float = 0.0

    @property
    def stats(self):
        """The `CommStats` of every group of this pipeline."""
        return self.mesh.stats

    # ---- request ---------------------------------------------------------------------------------
    def begin_request(self) -> None:
        self.unet_ctx.begin_request(None)
        self.vae_ctx.begin_request(None)
        self.step_seconds = []
        self.in_request = True

    def end_request(self) -> None:
        self.in_request = False
        self.unet_ctx.end_request()
        self.vae_ctx.end_request()

    # ---- UNet hooks --------------------------------------------------------------------------
    def unet_pre_hook(self, pipe, module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Cut the UNet's input down to this rank's CFG branch and row band."""
        for name in _SPATIAL_KWARGS:
            if kwargs.get(name) is not None:
                raise ValueError(f"patch parallelism does not support the UNet argument {name!r} (ControlNet/adapters) yet")
        args, kwargs = list(args), dict(kwargs)
        sample = args[0] if args else kwargs["sample"]
        if self.config.cfg == 2:
            args, kwargs = self._split_cfg(sample.shape[0], args, kwargs)
            sample = args[0] if args else kwargs["sample"]
        rows, cols = sample.shape[-2:]
        start, stop = band_bounds(rows, self.config.patch, self.mesh.comm("patch").rank)
        band = sample[:, :, start:stop]
        if args:
            args[0] = band
        else:
            kwargs["sample"] = band
        ctx = self.unet_ctx
        if self.in_request and ctx.step == -1:
            ctx.total_steps = len(pipe.scheduler.timesteps)
        ctx.begin_step(rows, cols)
        self._step_start = time.perf_counter()
        return tuple(args), kwargs

    def unet_hook(self, module, args: tuple, kwargs: dict, output: Any) -> Any:
        """All-gather every rank's band of the noise prediction into the full batch and image."""
        band = output[0] if isinstance(output, tuple) else output.sample
        self.unet_ctx.end_step()
        cfg, patch = self.config.cfg, self.config.patch
        everyone = self.mesh.comm("world").all_gather(band, "unet.output")
        batch, channels, rows, cols = band.shape
        full = everyone.view(cfg, patch, batch, channels, rows, cols).permute(0, 2, 3, 1, 4, 5)
        full = full.reshape(cfg * batch, channels, patch * rows, cols)
        self.step_seconds.append(time.perf_counter() - self._step_start)
        if isinstance(output, tuple):
            return (full,) + tuple(output[1:])
        output.sample = full
        return output

    def _split_cfg(self, batch: int, args: list, kwargs: dict) -> tuple[list, dict]:
        if batch % 2:
            raise ValueError(f"cfg=2 needs the unconditional and conditional batch halves; the UNet got batch {batch}")
        index = self.mesh.comm("cfg").rank
        half = batch // 2

        def cut(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
                return value[index * half : (index + 1) * half]
            return value

        args = [cut(a) for a in args]
        for name in ("sample", "timestep", *_BATCHED_KWARGS):
            if name in kwargs:
                kwargs[name] = cut(kwargs[name])
        if kwargs.get("added_cond_kwargs"):
            kwargs["added_cond_kwargs"] = {k: cut(v) for k, v in kwargs["added_cond_kwargs"].items()}
        return args, kwargs

    # ---- VAE decoder hooks -------------------------------------------------------------------------
    def decoder_pre_hook(self, module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Give the decoder this rank's band of latent rows."""
        args, kwargs = list(args), dict(kwargs)
        latents = args[0] if args else kwargs["sample"]
        comm = self.vae_ctx.comm
        start, stop = band_bounds(latents.shape[-2], comm.size, comm.rank)
        if args:
            args[0] = latents[:, :, start:stop]
        else:
            kwargs["sample"] = latents[:, :, start:stop]
        self.vae_ctx.begin_step(*latents.shape[-2:])
        return tuple(args), kwargs

    def decoder_hook(self, module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """All-gather the decoded bands into the whole image."""
        everyone = self.vae_ctx.comm.all_gather(output, "vae.output")
        size, batch, channels, rows, cols = everyone.shape
        return everyone.permute(1, 2, 0, 3, 4).reshape(batch, channels, size * rows, cols)

    # ---- the request's arguments ------------------------------------------------------------------
    def prepare_call(self, pipe, bound: inspect.BoundArguments) -> None:
        """Check the request on every rank before any collective; share the generator."""
        def arg(name: str):  # the value the pipeline will see: passed, or the signature's default
            if name in bound.arguments:
                return bound.arguments[name]
            return bound.signature.parameters[name].default

        vae_factor = pipe.vae_scale_factor
        default = pipe.unet.config.sample_size * vae_factor
        height, width = arg("height") or default, arg("width") or default
        steps = arg("num_inference_steps")
        if steps is not None and steps <= 0:
            raise ValueError(f"num_inference_steps must be positive, got {steps}")
        check_image_size(
            height, width, vae_factor=vae_factor, unet_factor=self.unet_factor,
            patch=self.config.patch, decode_parts=self.vae_ctx.comm.size,
        )
        if self.config.cfg == 2:
            guided = arg("guidance_scale") > 1 and pipe.unet.config.time_cond_proj_dim is None
            if not guided:
                raise ValueError("cfg=2 runs the two classifier-free-guidance branches on different ranks; "
                                 "it needs guidance_scale > 1 (and a model without guidance embedding)")
        if arg("generator") is None and arg("latents") is None:
            seed = broadcast_int(self.mesh.comm("world"), int(torch.randint(0, 2**62, (1,)).item()))
            bound.arguments["generator"] = torch.Generator(device="cpu").manual_seed(seed)


def _unet_factor(unet) -> int:
    """How much the UNet down-samples (a band must be a multiple of this many latent rows)."""
    if getattr(unet.config, "downsample_padding", 1) != 1:
        raise ValueError("patch parallelism needs UNet down-samplers with padding 1 (downsample_padding=1)")
    return 2 ** (len(unet.config.block_out_channels) - 1)


def parallelize(pipe, config: ParallelConfig | None = None):
    """Make a diffusers SD or SDXL pipeline run each request across all ranks, in place.

    Call `paragen.init()` first. Every rank builds the same pipeline (same weights) and calls it with
    the same arguments; each computes its share, and every rank returns the whole image.
    """
    if not isinstance(pipe, SUPPORTED_PIPELINES):
        names = ", ".join(c.__name__ for c in SUPPORTED_PIPELINES)
        raise TypeError(f"paragen.parallelize supports {names}; got {type(pipe).__name__}")
    if hasattr(pipe, "paragen"):
        raise ValueError("this pipeline is already parallelised")
    mesh = ParallelMesh(config or ParallelConfig(), device_type=pipe.device.type)
    resolved = mesh.config
    unet_ctx = PatchContext(mesh.comm("patch"), resolved.mode, resolved.warmup_steps, resolved.partial_fraction, "unet.")
    vae_ctx = PatchContext(mesh.comm("world"), label_prefix="vae.")
    runtime = ImageRuntime(resolved, mesh, unet_ctx, vae_ctx, _unet_factor(pipe.unet))
    if resolved.patch > 1:
        patch_modules(pipe.unet, unet_ctx)
    pipe.unet.register_forward_pre_hook(lambda m, a, k: runtime.unet_pre_hook(pipe, m, a, k), with_kwargs=True)
    pipe.unet.register_forward_hook(runtime.unet_hook, with_kwargs=True)
    if vae_ctx.comm.size > 1:
        patch_modules(pipe.vae.decoder, vae_ctx)
        pipe.vae.decoder.register_forward_pre_hook(runtime.decoder_pre_hook, with_kwargs=True)
        pipe.vae.decoder.register_forward_hook(runtime.decoder_hook, with_kwargs=True)
    pipe.paragen = runtime
    pipe.__class__ = _parallel_class(type(pipe))
    return pipe


_PARALLEL_CLASSES: dict[type, type] = {}


def _parallel_class(cls: type) -> type:
    """A subclass of `cls` (same name) whose `__call__` brackets the request for the runtime."""
    if cls not in _PARALLEL_CLASSES:
        original = cls.__call__
        signature = inspect.signature(original)

        def __call__(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            self.paragen.prepare_call(self, bound)
            self.paragen.begin_request()
            try:
                return original(*bound.args, **bound.kwargs)
            finally:
                self.paragen.end_request()

        __call__.__doc__ = original.__doc__
        _PARALLEL_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _PARALLEL_CLASSES[cls]
