"""`paragen video`: one text-to-video request — check, load, parallelise, generate, report, write MP4/GIF.

The model's pipeline class picks the workload: UNet video models (TextToVideoSD, AnimateDiff) split the frames
into clips (`--clip`, dual-scope temporal attention); Wan video transformers split the latent frames into clips
(`--clip`, dual-scope 3D attention) and shard each clip's tokens (`--ulysses`, `--ring`), with `--cfg`.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from typing import Any

import torch

from paragen.log import get_logger, warn_once
from paragen.parallel.clip import SCOPE_HELP, SCOPES, TemporalAttention, plan_clips
from paragen.comms import is_output_rank, world_size
from paragen.parallel.config import ParallelConfig
from paragen.pipelines import registry
from paragen.pipelines.dtypes import check_dtype
from paragen.pipelines.jobs.batch import open_batch
from paragen.pipelines.jobs.common import (Prepared, add_checkpoint_arguments, add_output_arguments,
                                           build_parallel_pipeline, check_room, checkpoint_folder, int_list,
                                           open_checkpoints, output_stem)
from paragen.pipelines.loading import EMBEDDED_MODELS, check_model_source
from paragen.pipelines.outputs import VIDEO_FORMATS, mp4_available, save_json, save_video
from paragen.pipelines.report import job_report
from paragen.pipelines.segments import segment_bounds
from paragen.pipelines.video import MAX_FRAMES, MAX_SIDE


@dataclass(frozen=True)
class VideoRequest:
    """Everything `paragen video` was asked for. Several prompts: one per segment of the video."""

    model: str = "tiny-t2v"
    prompts: tuple[str, ...] = ("a paper boat drifting down a river, watercolor",)
    segment_frames: tuple[int, ...] | None = None  # frames of each prompt's segment (default: even)
    negative_prompt: str = ""
    frames: int = 64
    height: int = 128
    width: int = 128
    steps: int = 20
    guidance_scale: float | None = None  # None: the pipeline's own default
    seed: int = 0
    dtype: str = "auto"  # float32 on CPU, bfloat16/float16 on a GPU
    allow_pickle: bool = False
    fps: int = 8
    format: str = "mp4"
    out_dir: str = "out"
    name: str | None = None
    checkpoint_dir: str | None = None  # save every rank's state here ...
    checkpoint_every: int = 5  # ... every this many steps
    resume: bool = False  # continue the run saved in checkpoint_dir

    def __post_init__(self) -> None:
        for field_name in ("frames", "height", "width", "steps", "fps", "checkpoint_every"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"{field_name} must be positive, got {getattr(self, field_name)}")
        if self.frames > MAX_FRAMES or max(self.height, self.width) > MAX_SIDE:
            raise ValueError(f"absurd size: {self.frames} frames of {self.height}x{self.width} (at most {MAX_FRAMES} "
                             f"frames of {MAX_SIDE} pixels a side)")
        if not self.prompts:
            raise ValueError("give at least one prompt")
        if len(self.prompts) > 1 or self.segment_frames is not None:
            segment_bounds(self.frames, len(self.prompts), None if self.segment_frames is None else list(self.segment_frames))
        check_dtype(self.dtype)
        if self.format not in VIDEO_FORMATS:
            raise ValueError(f"format must be one of {', '.join(VIDEO_FORMATS)}, got {self.format!r}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume needs the checkpoint folder of the run to continue")

    def prompt_options(self) -> dict:
        """The pipeline call's prompt arguments: one prompt, or paragen's per-segment prompts."""
        if len(self.prompts) == 1 and self.segment_frames is None:
            return {"prompt": self.prompts[0]}
        options = {"segment_prompts": list(self.prompts)}
        if self.segment_frames is not None:
            options["segment_frames"] = list(self.segment_frames)
        return options


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `paragen video`."""
    defaults, temporal = VideoRequest(), TemporalAttention()
    p.description = ("Generate one video across every rank: UNet video models split its frames into clips, one per "
                     "rank; Wan models split its latent frames into clips and each clip's tokens into shards "
                     "(Ulysses, Ring).")
    p.add_argument("--model", default=defaults.model,
                   help=f"embedded model name ({', '.join(m for m in EMBEDDED_MODELS if m in ('tiny-t2v', 'tiny-animatediff', 'tiny-wan'))}) "
                        "or a local diffusers TextToVideoSD/AnimateDiff/Wan directory (safetensors)")
    p.add_argument("--prompt", action="append", default=None,
                   help=f"text prompt; repeat it for one prompt per consecutive segment of the video (default: {defaults.prompts[0]!r})")
    p.add_argument("--segment-frames", default=None,
                   help="comma-separated frames of each prompt's segment, adding up to --frames (default: even)")
    p.add_argument("--negative-prompt", default=defaults.negative_prompt, help="negative prompt")
    p.add_argument("--frames", type=int, default=defaults.frames, help="frames of the video")
    p.add_argument("--height", type=int, default=defaults.height, help="frame height in pixels")
    p.add_argument("--width", type=int, default=defaults.width, help="frame width in pixels")
    p.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale; default: the pipeline's")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (the same on every rank)")
    p.add_argument("--clip", type=int, default=-1,
                   help="clips the frames are split into (UNet video models, -1: every rank; Wan models: latent "
                        "frames, -1: 1 clip, the ranks left over go to --ring)")
    p.add_argument("--ulysses", type=int, default=1,
                   help="Wan models: Ulysses degree (all-to-all to head shards; must divide the head count)")
    p.add_argument("--ring", type=int, default=-1, help="Wan models: Ring degree (-1: the ranks left over)")
    p.add_argument("--cfg", type=int, default=1, choices=(1, 2),
                   help="Wan models: 2 runs the conditional and unconditional calls on different halves of the ranks")
    p.add_argument("--scope", choices=SCOPES, default=temporal.scope,
                   help="; ".join(f"{s}: {text}" for s, text in SCOPE_HELP.items()))
    p.add_argument("--local", type=int, default=temporal.local,
                   help="dual scope: local window half width p, in frames (Wan: the latent edge frames each clip "
                        "sees of each neighbouring clip)")
    p.add_argument("--global-frames", type=int, default=temporal.global_frames,
                   help="dual scope: frames sampled evenly over the video that every frame also attends to (Wan: "
                        "latent frames)")
    p.add_argument("--bias", type=float, default=temporal.bias,
                   help="dual scope, UNet video models: logit bias for the global frames at timesteps >= --bias-switch, "
                        "for the local window below (default: Video-Infinity's 10; Wan models take none)")
    p.add_argument("--bias-switch", type=int, default=temporal.bias_switch, help="dual scope: timestep (of 1000) where the bias switches")
    p.add_argument("--blocking", action="store_true",
                   help="exchange, wait, then attend (Video-Infinity's released code), instead of overlapping the exchange")
    p.add_argument("--fps", type=int, default=defaults.fps, help="frames per second of the written video")
    p.add_argument("--format", choices=VIDEO_FORMATS, default=defaults.format,
                   help="mp4 (needs imageio-ffmpeg: pip install 'paragen[video]'; GIF if missing) or gif")
    add_checkpoint_arguments(p, defaults.checkpoint_every)
    add_output_arguments(p, defaults.out_dir, "the video and the JSON run report")


def _options(args: argparse.Namespace) -> TemporalAttention:
    """What each clip's attention sees of the other clips (the same options for UNet and Wan video models)."""
    return TemporalAttention(scope=args.scope, local=args.local, global_frames=args.global_frames, bias=args.bias,
                             bias_switch=args.bias_switch, overlap=not args.blocking)


def prepare(args: argparse.Namespace, launch) -> Prepared:
    """Every check of the request that needs no other rank, on every rank, before the process group."""
    segments = None if args.segment_frames is None else tuple(int_list(args.segment_frames, "--segment-frames"))
    request = VideoRequest(
        model=args.model, prompts=tuple(args.prompt or VideoRequest().prompts), segment_frames=segments,
        negative_prompt=args.negative_prompt, frames=args.frames, height=args.height, width=args.width,
        steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed, dtype=args.dtype,
        allow_pickle=args.allow_pickle, fps=args.fps, format=args.format, out_dir=args.out, name=args.name,
        checkpoint_dir=checkpoint_folder(args), checkpoint_every=args.checkpoint_every, resume=args.resume is not None,
    )
    class_name = check_model_source(args.model, allow_pickle=args.allow_pickle)
    options = _options(args)
    workload = registry.find_for_job("video", class_name, options, args.model)
    config = workload.resolve(ParallelConfig(clip=args.clip, cfg=args.cfg, ulysses=args.ulysses, ring=args.ring),
                              launch.world_size)

    def check(one: VideoRequest) -> VideoRequest:
        """The request as it runs: checked, and written as a GIF when MP4 was asked for but cannot be written."""
        if workload.name == "video":  # a Wan model's clips cut latent frames: checked at the call, on every rank
            plan_clips(one.frames, config.clip, options, conv_halo=0)  # the model's own halo: at the call
        check_room(args, one, config, launch, options)
        if one.format == "mp4" and not mp4_available():
            warn_once("imageio-ffmpeg is not installed (pip install 'paragen[video]'): writing a GIF instead of MP4")
            return dataclasses.replace(one, format="gif")
        return one

    batch = open_batch(args, launch, request, check)
    if batch is not None:
        return Prepared(request, workload, config, options, check, batch=batch)
    item = check(request)
    checkpoints = open_checkpoints(request, config, workload, options, launch.rank, launch.world_size,
                                   also_resumable=("format", "fps"))
    return Prepared(request, workload, config, options, check, item=item, checkpoints=checkpoints)


def load(job: Prepared) -> Any:
    """The job's pipeline on this rank's device, parallelised."""
    pipe = build_parallel_pipeline(job)
    pipe.set_progress_bar_config(disable=not is_output_rank(), desc=f"{world_size()} rank(s)")
    return pipe


def generate(job: Prepared, pipe, request: VideoRequest, load_s: float) -> dict | None:
    """One video on every rank; the output rank writes the video + JSON and returns the report."""
    log = get_logger()
    loaded = time.perf_counter()
    options = {} if request.guidance_scale is None else {"guidance_scale": request.guidance_scale}
    frames = pipe(
        num_frames=request.frames,
        negative_prompt=request.negative_prompt or None,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        generator=torch.Generator().manual_seed(request.seed),
        output_type="np",
        **request.prompt_options(),
        **options,
    ).frames
    generated = time.perf_counter()
    report = job_report("video", asdict(request), pipe, job.workload, job.options, load_s=load_s,
                        generate_s=generated - loaded)
    if report is None:
        return None
    size = f"{request.frames}f_{request.height}x{request.width}"
    stem = output_stem(request, job.config, job.options, size)
    out_dir = Path(request.out_dir)
    path = save_video(frames[0], out_dir / f"{stem}.{request.format}", request.fps)
    report.update(video=str(path), frames_per_s=request.frames / (generated - loaded))
    save_json(report, out_dir / f"{stem}.json")
    log.info("wrote %s and %s.json (%d frames in %.2f s: %.2f frames/s)", path, stem, request.frames,
             generated - loaded, report["frames_per_s"])
    return report
