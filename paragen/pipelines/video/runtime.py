"""Clip-parallel text-to-video: `parallelize(pipe, ParallelConfig(clip=N), TemporalAttention())` for
diffusers' `TextToVideoSDPipeline` (UNet3DConditionModel) and `AnimateDiffPipeline` (UNetMotionModel).

Every rank runs the pipeline's own loop and scheduler on the whole latent `[B, C, F, H, W]` (cheap), but
its UNet call, intercepted, denoises only the rank's clip of frames. Spatial
layers are per frame and need nothing; the temporal ones are converted in place
(`parallel/clip`): temporal attention processors (full or dual scope), GroupNorms over frames with the
whole video's statistics, temporal conv stacks with a frame halo, and AnimateDiff's frame positions taken
in the whole video. The clips' noise predictions are all-gathered (the latent is small), so every rank
steps the same latent. `decode_latents` is intercepted: each rank decodes its own frames, and the frames are
gathered on the output rank (rank 0 of the clip group), each clip handed on as it arrives (a server streams it); the
other ranks get a video of zero frames.

Call options of paragen's own: `segment_prompts=[...]` gives each of that many consecutive segments of
the video its own prompt (`segment_frames=[...]` sets their lengths; default: as even as possible).
Checkpoints (`enable_checkpoints`, through the step hook) save every rank's clip of the latent, the scheduler
and the generator every K steps; a resumed run skips the finished steps without computing and restores the last.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from paragen.parallel import ParallelConfig, ParallelMesh
from paragen.parallel.clip import ClipLayout, TemporalAttention, plan_clips
from paragen.parallel.clip.attention import ClipTemporalAttnProcessor
from paragen.parallel.clip.context import ClipContext
from paragen.parallel.clip.conv import ClipTemporalConv
from paragen.parallel.clip.norm import ClipGroupNorm
from paragen.parallel.clip.positions import ClipFramePositions
from paragen.parallel.intercept import intercept
from paragen.parallel.partition import check_image_size
from paragen.parallel.steps import StepPlan
from paragen.pipelines.checkpoint import StepCheckpoints
from paragen.pipelines.patch.runtime import unet_downsampling
from paragen.pipelines.request_args import MAX_FRAMES, MAX_SIDE, check_steps, request_arg, share_generator
from paragen.pipelines.runtime import PipelineRuntime
from paragen.pipelines.segments import check_segment_request, take_segment_options
from paragen.pipelines.step_hook import install_step_hook

TEMPORAL_TRANSFORMERS = ("TransformerTemporalModel", "AnimateDiffTransformer3D")


def check_request(request: Any, config: ParallelConfig, options: TemporalAttention) -> None:
    """A `paragen video` request's frames cut into `config.clip` clips (the UNet's own halo is checked at the call,
    once the model is known)."""
    plan_clips(request.frames, config.clip, options, conv_halo=0)


def check_video_size(frames: int, height: int, width: int, vae_factor: int, unet_factor: int) -> None:
    """ValueError for a non-positive or absurd video size, or one the UNet cannot take."""
    if not 0 < frames <= MAX_FRAMES:
        raise ValueError(f"num_frames must be in [1, {MAX_FRAMES}], got {frames}")
    for name, value in (("height", height), ("width", width)):
        if value > MAX_SIDE:
            raise ValueError(f"{name} {value} is beyond {MAX_SIDE} pixels")
    check_image_size(height, width, vae_factor=vae_factor, unet_factor=1, patch=1, decode_parts=1)
    for name, value in (("height", height), ("width", width)):
        if (value // vae_factor) % unet_factor:
            raise ValueError(f"{name} {value}: the latent must be a multiple of {unet_factor} (the UNet's "
                             f"down-sampling); use a multiple of {vae_factor * unet_factor} pixels")


class SegmentPromptProcessor:
    """Wraps a spatial cross-attention processor: each frame of the conditional batch half attends to its
    segment's prompt instead of the pipeline's one prompt."""

    def __init__(self, inner: Any, runtime: "VideoRuntime") -> None:
        self.inner = inner
        self.runtime = runtime

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        texts = self.runtime.frame_text
        if texts is not None and encoder_hidden_states is not None:
            frames = texts.shape[0]
            per_frame = encoder_hidden_states.reshape((-1, frames) + encoder_hidden_states.shape[1:]).clone()
            per_frame[-1] = texts.to(per_frame)  # the conditional half is the last (diffusers: [uncond, cond])
            encoder_hidden_states = per_frame.reshape(encoder_hidden_states.shape)
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def install_clip_layers(unet: torch.nn.Module, ctx: ClipContext) -> int:
    """Convert the UNet's temporal layers in place (checked: see `check`); return the temporal convs' stacked
    halo (0 if none)."""
    halo = 0
    for module in list(unet.modules()):
        kind = type(module).__name__
        if kind in TEMPORAL_TRANSFORMERS:
            ClipGroupNorm.convert(module.norm, ctx)
            for block in module.transformer_blocks:
                for attn in (block.attn1, block.attn2):
                    if attn is not None:
                        attn.set_processor(ClipTemporalAttnProcessor(ctx))
                if block.pos_embed is not None:
                    ClipFramePositions.convert(block.pos_embed, ctx)
        elif kind == "TemporalConvLayer":
            halo = max(halo, ClipTemporalConv.convert(module, ctx).halo)
    return halo


def install_segment_prompts(unet: torch.nn.Module, runtime: "VideoRuntime") -> None:
    """Wrap the processors of the UNet's spatial cross-attention layers (see `SegmentPromptProcessor`)."""
    processors = unet.attn_processors
    for name, processor in processors.items():
        module = unet.get_submodule(name.removesuffix(".processor"))
        if module.is_cross_attention:
            processors[name] = SegmentPromptProcessor(processor, runtime)
    unet.set_attn_processor(processors)


# The output dataclass of each video UNet class: (module, class name).
OUTPUT_CLASSES = {"UNet3DConditionModel": ("diffusers.models.unets.unet_3d_condition", "UNet3DConditionOutput"),
                  "UNetMotionModel": ("diffusers.models.unets.unet_motion_model", "UNetMotionOutput")}


def _output_class(unet) -> type:
    """The UNet's own output dataclass (`OUTPUT_CLASSES`)."""
    module, name = OUTPUT_CLASSES[type(unet).__name__]
    return getattr(importlib.import_module(module), name)


@dataclass
class VideoRuntime(PipelineRuntime):
    """What `parallelize` attaches to a video pipeline as `pipe.paragen`."""

    ctx: ClipContext = None  # type: ignore[assignment]
    conv_halo: int = 0
    output_class: type = None  # type: ignore[assignment]
    checkpoints: StepCheckpoints | None = None
    # per request
    generator: Any = None
    segment_text: torch.Tensor | None = None  # [segments, tokens, dim]
    segment_of_frame: list[int] = field(default_factory=list)
    frame_text: torch.Tensor | None = None  # this clip's frames' prompt embeddings

    @property
    def comm(self):
        """The clip group."""
        return self.ctx.comm

    @property
    def layout(self) -> ClipLayout:
        return self.ctx.layout

    def enable_checkpoints(self, checkpoints: StepCheckpoints) -> None:
        """Save every rank's state as `checkpoints` says, and continue from its resume step (checked, with
        the folder, before any collective: `StepCheckpoints.open`)."""
        self.checkpoints = checkpoints

    # ---- the request ---------------------------------------------------------------------------
    def take_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return take_segment_options(kwargs)

    def prepare_call(self, pipe, bound: inspect.BoundArguments, segment_prompts: list[str] | None = None,
                     segment_frames: list[int] | None = None) -> None:
        """Check the request and lay out the clips on every rank before any collective."""
        check_steps(bound)
        if getattr(pipe, "free_noise_enabled", False):
            raise ValueError("clip parallelism replaces FreeNoise's sliding windows; disable free noise first")
        vae_factor = pipe.vae_scale_factor
        default = pipe.unet.config.sample_size * vae_factor
        frames = request_arg(bound, "num_frames")
        height, width = request_arg(bound, "height") or default, request_arg(bound, "width") or default
        check_video_size(frames, height, width, vae_factor, unet_downsampling(pipe.unet))
        self.ctx.layout = plan_clips(frames, self.comm.size, self.ctx.temporal, self.conv_halo)
        self.ctx.train_timesteps = pipe.scheduler.config.num_train_timesteps
        self._prepare_segments(pipe, bound, segment_prompts, segment_frames)
        if self.checkpoints is not None:
            install_step_hook(pipe.scheduler, lambda latents: self.on_step_end(pipe.scheduler, latents))
        share_generator(bound, self.mesh.group("world"))
        self.generator = request_arg(bound, "generator")

    def _prepare_segments(self, pipe, bound, prompts: list[str] | None, lengths: list[int] | None) -> None:
        self.segment_text, self.frame_text = None, None
        of_frame = check_segment_request(bound, self.layout.frames, prompts, lengths)
        if of_frame is None:
            return
        self.segment_of_frame = of_frame
        with torch.no_grad():
            self.segment_text = torch.cat([pipe.encode_prompt(p, pipe.device, 1, False)[0] for p in prompts])

    def begin_request(self) -> None:
        super().begin_request()
        if self.segment_text is not None:
            own = self.segment_of_frame[self.ctx.start : self.ctx.stop]
            self.frame_text = self.segment_text[own]

    def end_request(self) -> None:
        super().end_request()
        self.frame_text = None

    # ---- the UNet call ---------------------------------------------------------------------------
    def unet_call(self, pipe, forward, *args, **kwargs):
        """The noise prediction of one step: this clip denoised, every clip's prediction gathered."""
        args, kwargs = list(args), dict(kwargs)
        sample = args.pop(0) if args else kwargs.pop("sample")
        timestep = args.pop(0) if args else kwargs.pop("timestep")
        text = args.pop(0) if args else kwargs.pop("encoder_hidden_states")
        return_dict = kwargs.pop("return_dict", True)
        self.start_step(pipe)
        self.plan.begin_step()
        self.ctx.timestep = float(timestep)
        if self.checkpoints is not None and self.checkpoints.skipped(self.plan.step):
            eps = torch.zeros_like(sample)  # done before the interruption; restored at its last step
        else:
            start, stop, frames = self.ctx.start, self.ctx.stop, self.layout.frames
            if text.shape[0] == sample.shape[0] * frames:  # per-frame text (AnimateDiff repeats it per frame)
                text = text.reshape((sample.shape[0], frames) + text.shape[1:])[:, start:stop].flatten(0, 1)
            own = forward(sample[:, :, start:stop], timestep, text, *args, return_dict=False, **kwargs)[0]
            eps = self.comm.all_gather_varlen(own, 2, list(self.layout.sizes), "clip.eps")
        self.record_step()
        return self.output_class(sample=eps) if return_dict else (eps,)

    def decode_call(self, decode, latents: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """This clip's frames decoded, gathered on the output rank (the others get zero frames), each clip handed to
        the request's watch as it arrives there."""
        own = decode(latents[:, :, self.ctx.start : self.ctx.stop], *args, **kwargs)
        sizes = list(self.layout.sizes)
        video = self.comm.gather_varlen(own, 2, sizes, 0, "clip.frames",
                                        lambda clip, frames: self.emit_clip(clip, len(sizes), frames))
        return own[:, :, :0] if video is None else video

    # ---- checkpoints -------------------------------------------------------------------------------
    def on_step_end(self, scheduler, latents: torch.Tensor) -> None:
        """After a scheduler step: restore a resumed run, or save a checkpoint (of the latent as a
        `[B, C, F, H, W]` view, whichever layout the pipeline steps)."""
        if latents.dim() == 4:  # TextToVideoSD steps the scheduler on [B·F, C, H, W]
            latents = latents.view((-1, self.layout.frames) + latents.shape[1:]).transpose(1, 2)
        i, saved = self.plan.step, self.checkpoints
        if saved.restores_after(i):
            state = saved.restore(scheduler, self.generator)
            latents.copy_(self.comm.all_gather_varlen(state["latents"].to(latents), 2, list(self.layout.sizes), "clip.resume"))
        elif saved.saves_after(i, self.plan.total_steps):
            saved.save(i, scheduler, self.generator, latents[:, :, self.ctx.start : self.ctx.stop])


def check(pipe, config: ParallelConfig, options: TemporalAttention) -> None:
    """Refuse a UNet without temporal transformers, or with cross-attention in one."""
    found = [m for m in pipe.unet.modules() if type(m).__name__ in TEMPORAL_TRANSFORMERS]
    if not found:
        raise ValueError(f"{type(pipe.unet).__name__} has no temporal transformer ({', '.join(TEMPORAL_TRANSFORMERS)})")
    for module in found:
        for block in module.transformer_blocks:
            if any(attn is not None and attn.is_cross_attention for attn in (block.attn1, block.attn2)):
                raise ValueError(f"{type(module).__name__} has cross-attention in a temporal block; clip parallelism "
                                 "supports temporal self-attention only")


def install(pipe, config: ParallelConfig, options: TemporalAttention):
    """Make a checked TextToVideoSD or AnimateDiff pipeline split each video's frames over the ranks of `config`."""
    mesh = ParallelMesh(config, pipe.device)
    ctx = ClipContext(mesh.group("clip"), options)
    runtime = VideoRuntime(config, mesh, StepPlan(mesh.group("clip"), label_prefix="clip."), None, ctx=ctx,
                           output_class=_output_class(pipe.unet))
    runtime.conv_halo = install_clip_layers(pipe.unet, ctx)
    install_segment_prompts(pipe.unet, runtime)
    intercept(pipe.unet, "forward", lambda forward, *a, **k: runtime.unet_call(pipe, forward, *a, **k), tag="video.unet")
    intercept(pipe, "decode_latents", runtime.decode_call, tag="video.decode")
    runtime.install(pipe)
    return pipe
