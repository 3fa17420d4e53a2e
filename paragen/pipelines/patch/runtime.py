"""UNet patch parallelism: a stock diffusers SD / SDXL pipeline, parallel in place.

What changes, and how (no diffusers model code is forked):
- UNet: convs, group norms and attention processors become patch-parallel (`convert.py`). Its call is
  intercepted: each rank's UNet runs on its CFG branch (batch half) and its row band of the latent, and
  the bands' noise predictions are all-gathered so every rank holds the full, identical latent and the
  pipeline's own loop and scheduler run unchanged.
- VAE decoder: split into bands over *all* ranks, exact (`vae_decode.py`: halo convs, gathered GroupNorm statistics,
  gathered K/V in the mid-block attention); the image is all-gathered at the end.
- `pipe(...)`: the call is intercepted (`PipelineRuntime.call`) to check the request before any
  collective, give every rank the same random generator when the user passed none, and mark the
  request's start and end for the step plan (warm-up, stale steps).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from paragen.parallel import ParallelConfig, ParallelMesh
from paragen.parallel.config import ExchangeConfig
from paragen.parallel.intercept import intercept
from paragen.parallel.partition import band_bounds, check_image_size
from paragen.pipelines.model_facts import model_facts
from paragen.parallel.patch import PatchContext, PatchInputConv2d
from paragen.parallel.patch.convert import check_processors, patch_modules
from paragen.pipelines.batch_split import split_batch
from paragen.pipelines.request_args import check_steps, request_arg, share_generator
from paragen.pipelines.runtime import PipelineRuntime
from paragen.pipelines.vae_decode import ParallelVaeDecoder

# UNet keyword arguments carrying spatial residuals (ControlNet, T2I-Adapter): not band-aware yet.
_SPATIAL_KWARGS = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals")


@dataclass
class ImageRuntime(PipelineRuntime):
    """What `parallelize` attaches to a UNet pipeline as `pipe.paragen` (`plan` is the UNet's `PatchContext`)."""

    unet_factor: int = 1

    # ---- the UNet call ---------------------------------------------------------------------------
    def unet_call(self, pipe, forward, *args, **kwargs) -> Any:
        """The UNet on this rank's CFG branch and row band; every band's prediction gathered."""
        args, kwargs = self._cut(pipe, args, kwargs)
        return self._gather(forward(*args, **kwargs))

    def _cut(self, pipe, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Cut the UNet's input down to this rank's CFG branch and row band."""
        for name in _SPATIAL_KWARGS:
            if kwargs.get(name) is not None:
                raise ValueError(f"patch parallelism does not support the UNet argument {name!r} (ControlNet/adapters) yet")
        args, kwargs = list(args), dict(kwargs)
        sample = args[0] if args else kwargs["sample"]
        if self.config.cfg == 2:
            args, kwargs = split_batch(args, kwargs, sample.shape[0], self.mesh.group("cfg").rank, 2)
            sample = args[0] if args else kwargs["sample"]
        rows, cols = sample.shape[-2:]
        start, stop = band_bounds(rows, self.config.patch, self.mesh.group("patch").rank)
        band = sample[:, :, start:stop]
        if args:
            args[0] = band
        else:
            kwargs["sample"] = band
        self.start_step(pipe)
        self.plan.begin_step(rows, cols, sample)
        return tuple(args), kwargs

    def _gather(self, output: Any) -> Any:
        """All-gather every rank's band of the noise prediction into the full batch and image."""
        band = output[0] if isinstance(output, tuple) else output.sample
        self.plan.end_step()  # launch the queued stale data before the blocking gather
        cfg, patch = self.config.cfg, self.config.patch
        everyone = self.mesh.group("world").all_gather(band, "unet.output")
        batch, channels, rows, cols = band.shape
        full = everyone.view(cfg, patch, batch, channels, rows, cols).permute(0, 2, 3, 1, 4, 5)
        full = full.reshape(cfg * batch, channels, patch * rows, cols)
        self.record_step()
        if isinstance(output, tuple):
            return (full,) + tuple(output[1:])
        output.sample = full
        return output

    # ---- the request's arguments ------------------------------------------------------------------
    def prepare_call(self, pipe, bound: inspect.BoundArguments) -> None:
        """Check the request on every rank before any collective; share the generator."""
        vae_factor = pipe.vae_scale_factor
        default = pipe.unet.config.sample_size * vae_factor
        height, width = request_arg(bound, "height") or default, request_arg(bound, "width") or default
        check_steps(bound)
        check_image_size(
            height, width, vae_factor=vae_factor, unet_factor=self.unet_factor,
            patch=self.config.patch, decode_parts=self.vae.world.size,
        )
        if self.config.cfg == 2:
            guided = request_arg(bound, "guidance_scale") > 1 and pipe.unet.config.time_cond_proj_dim is None
            if not guided:
                raise ValueError("cfg=2 runs the two classifier-free-guidance branches on different ranks; "
                                 "it needs guidance_scale > 1 (and a model without guidance embedding)")
        share_generator(bound, self.mesh.group("world"))


def unet_downsampling(unet) -> int:
    """How much a diffusers UNet down-samples its latent (2 per block after the first)."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def check(pipe, config: ParallelConfig, options: ExchangeConfig) -> None:
    """Refuse a UNet whose down-samplers or attention processors patch parallelism cannot split."""
    if getattr(pipe.unet.config, "downsample_padding", 1) != 1:
        raise ValueError("patch parallelism needs UNet down-samplers with padding 1 (downsample_padding=1)")
    check_processors(pipe.unet)


def check_request(request: Any, config: ParallelConfig, options: ExchangeConfig) -> None:
    """A job's request cut into `config.patch` bands and decoded in bands over every rank, checked from the model's
    configs before it is loaded (the call checks it again, with the loaded pipeline's factors)."""
    facts = model_facts(request.model)
    if facts is None or request.height is None or request.width is None:
        return
    unet_factor = 2 ** (len(facts.denoiser_config["block_out_channels"]) - 1)
    check_image_size(request.height, request.width, vae_factor=facts.vae.factor, unet_factor=unet_factor,
                     patch=config.patch, decode_parts=config.cfg * config.patch)


def install(pipe, config: ParallelConfig, options: ExchangeConfig):
    """Make a checked SD or SDXL pipeline run each request across the ranks of the resolved `config`, in place."""
    mesh = ParallelMesh(config, pipe.device)
    unet_ctx = PatchContext(mesh.group("patch"), options.mode, options.warmup_steps, options.partial_fraction, "unet.")
    vae = ParallelVaeDecoder(pipe.vae, mesh.group("world"))
    runtime = ImageRuntime(config, mesh, unet_ctx, vae, unet_factor=unet_downsampling(pipe.unet))
    if config.patch > 1:
        if not pipe.unet.config.center_input_sample:  # else conv_in's input is not the latent every rank holds
            PatchInputConv2d.convert(pipe.unet.conv_in, unet_ctx)
        patch_modules(pipe.unet, unet_ctx)
    intercept(pipe.unet, "forward", lambda forward, *a, **k: runtime.unet_call(pipe, forward, *a, **k), tag="patch.unet")
    runtime.install(pipe)
    return pipe
