"""`paragen video`: one text-to-video request — check, load, parallelise, generate, report, write MP4/GIF.

The model's pipeline class picks the workload: UNet video models (TextToVideoSD, AnimateDiff) split the frames
into clips (`--clip`, dual-scope temporal attention); Wan video transformers split the latent frames into clips
(`--clip`, dual-scope 3D attention) and shard each clip's tokens (`--ulysses`, `--ring`), with `--cfg`.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from paragen.log import get_logger, warn_once
from paragen.parallel.clip import SCOPE_HELP, SCOPES, TemporalAttention
from paragen.comms import is_output_rank, world_size
from paragen.pipelines import registry
from paragen.pipelines.dtypes import DtypeName
from paragen.parallel.interrupt import Watch
from paragen.pipelines.jobs import fields, schema
from paragen.pipelines.jobs.batch import request_file
from paragen.pipelines.jobs.plan import add_layout_argument, chosen_layout
from paragen.pipelines.jobs.common import (Prepared, add_cache_arguments, add_checkpoint_arguments,
                                           add_memory_arguments, add_output_arguments, build_parallel_pipeline,
                                           check_room, checkpoint_folder, fit_to_model, open_checkpoints, output_stem,
                                           step_cache_config)
from paragen.pipelines.jobs.schema import field, request_class
from paragen.pipelines.loading import check_model_source
from paragen.pipelines.outputs import mp4_available, save_json, save_video
from paragen.pipelines.report import job_report
from paragen.pipelines.request_args import MAX_FRAMES
from paragen.pipelines.runtime import WATCH_OPTION
from paragen.pipelines.segments import segment_bounds

MAX_SEGMENTS = 4096  # prompts of one video
MADE_ALONE = ("a video's clips, segment prompts and decode chunks are laid out over the ranks for that one video; "
              "serve long videos as asynchronous jobs, POST /v1/videos")  # why `serve video` does not batch


@request_class
class VideoRequest:
    """Everything `paragen video` was asked for (one declaration per field, see `schema`). Several prompts: one per
    segment of the video."""

    model: str = fields.model("tiny-t2v", "embedded model name (tiny-t2v, tiny-animatediff, tiny-wan, tiny-wan22, "
                                          "tiny-ltx, tiny-cogvideox, tiny-hunyuanvideo, tiny-mochi, tiny-allegro), a "
                                          "local diffusers directory of one of those pipelines (safetensors), or a "
                                          "Hugging Face Hub id org/name[@revision]")
    prompts: tuple[str, ...] = field(("a paper boat drifting down a river, watercolor",),
                                     "text prompt; repeat it for one prompt per consecutive segment of the video",
                                     flag="--prompt", min_length=1, max_length=MAX_SEGMENTS)
    segment_frames: tuple[int, ...] | None = field(None, "frames of each prompt's segment, adding up to --frames "
                                                         "(default: even)", max_length=MAX_SEGMENTS)
    negative_prompt: str = fields.negative_prompt()
    frames: int | None = field(None, "frames of the video (default: the pipeline's own)", gt=0, le=MAX_FRAMES)
    height: int | None = fields.side("height", "frame")
    width: int | None = fields.side("width", "frame")
    steps: int = fields.steps()
    guidance_scale: float | None = fields.guidance_scale("classifier-free guidance scale")
    seed: int = fields.seed()
    dtype: DtypeName = fields.dtype()
    allow_pickle: bool = fields.allow_pickle()
    shard_weights: bool = fields.shard_weights()
    offload_layers: bool = fields.offload_layers()
    memory_gib: float | None = fields.memory_gib()
    cache: fields.CacheMethod = fields.cache()
    cache_threshold: float = fields.cache_threshold()
    cache_interval: int = fields.cache_interval()
    cache_order: int = fields.cache_order()
    cache_start: int = fields.cache_start()
    fps: int = field(8, "frames per second of the written video", gt=0, le=240)
    format: Literal["mp4", "gif"] = field("mp4", "mp4 (needs imageio-ffmpeg: pip install 'paragen[video]'; GIF if "
                                                 "missing) or gif")
    out_dir: str = fields.out_dir("the video and the JSON run report")
    name: str | None = fields.name()
    checkpoint_dir: str | None = fields.checkpoint_dir()
    checkpoint_every: int = fields.checkpoint_every(5)
    resume: bool = fields.resume()

    def __post_init__(self) -> None:
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume needs the checkpoint folder of the run to continue")

    def check_segments(self) -> None:
        """Refuse segment prompts and lengths that do not cut the video's frames (known once fitted to the model)."""
        if len(self.prompts) > 1 or self.segment_frames is not None:
            segment_bounds(self.frames, len(self.prompts),
                           None if self.segment_frames is None else list(self.segment_frames))

    def prompt_options(self) -> dict:
        """The pipeline call's prompt arguments: one prompt, or paragen's per-segment prompts."""
        if len(self.prompts) == 1 and self.segment_frames is None:
            return {"prompt": self.prompts[0]}
        options = {"segment_prompts": list(self.prompts)}
        if self.segment_frames is not None:
            options["segment_frames"] = list(self.segment_frames)
        return options


REQUEST = VideoRequest  # what `paragen plan video` builds from the same options
REQUEST_OPTIONS = ("model", "prompts", "segment_frames", "negative_prompt", "frames", "height", "width", "steps",
                   "guidance_scale", "seed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `paragen video`."""
    temporal = TemporalAttention()
    p.description = ("Generate one video across every rank: UNet video models split its frames into clips, one per "
                     "rank; video transformers (`paragen models`) split its latent frames into clips and each clip's "
                     "tokens into shards (Ulysses, Ring).")
    schema.add_arguments(p, VideoRequest, REQUEST_OPTIONS)
    registry.add_degree_arguments(p, "video")
    add_layout_argument(p)
    p.add_argument("--scope", choices=SCOPES, default=temporal.scope,
                   help="; ".join(f"{s}: {text}" for s, text in SCOPE_HELP.items()))
    p.add_argument("--local", type=int, default=temporal.local,
                   help="dual scope: local window half width p, in frames (video transformers: the latent edge "
                        "frames each clip sees of each neighbouring clip)")
    p.add_argument("--global-frames", type=int, default=temporal.global_frames,
                   help="dual scope: frames sampled evenly over the video that every frame also attends to (video "
                        "transformers: latent frames)")
    p.add_argument("--bias", type=float, default=temporal.bias,
                   help="dual scope, UNet video models: logit bias for the global frames at timesteps >= --bias-switch, "
                        "for the local window below (default: Video-Infinity's 10; video transformers take none)")
    p.add_argument("--bias-switch", type=int, default=temporal.bias_switch, help="dual scope: timestep (of 1000) where the bias switches")
    p.add_argument("--blocking", action="store_true",
                   help="exchange, wait, then attend (Video-Infinity's released code), instead of overlapping the exchange")
    schema.add_arguments(p, VideoRequest, ("fps", "format"))
    add_checkpoint_arguments(p, VideoRequest)
    add_memory_arguments(p, VideoRequest)
    add_cache_arguments(p, VideoRequest)
    add_output_arguments(p, VideoRequest)


def _options(args: argparse.Namespace) -> TemporalAttention:
    """What each clip's attention sees of the other clips (the same options for UNet and Wan video models)."""
    return TemporalAttention(scope=args.scope, local=args.local, global_frames=args.global_frames, bias=args.bias,
                             bias_switch=args.bias_switch, overlap=not args.blocking)


def prepare(args: argparse.Namespace, launch) -> Prepared:
    """Every check of the request that needs no other rank, on every rank, before the process group."""
    request = schema.from_arguments(VideoRequest, args, checkpoint_dir=checkpoint_folder(args),
                                    resume=args.resume is not None)
    class_name = check_model_source(args.model, allow_pickle=args.allow_pickle)
    options = _options(args)
    workload, config, options = chosen_layout(args, "video", class_name, request, launch, options)
    workload.check_weight_sharding(request.shard_weights, launch.world_size)
    step_cache_config(request, options)  # refused here, before the process group, if it cannot run

    def check(one: VideoRequest) -> VideoRequest:
        """The request as it runs: at the model's own size and frames where it gives none, fitting this rank, and
        written as a GIF when MP4 was asked for but cannot be written."""
        one = fit_to_model(one)
        one.check_segments()
        workload.check_request(one, config, options)
        check_room(args, one, config, launch, options)
        if one.format == "mp4" and not mp4_available():
            warn_once("imageio-ffmpeg is not installed (pip install 'paragen[video]'): writing a GIF instead of MP4")
            return schema.replace(one, format="gif")
        return one

    prepared = Prepared(request, workload, config, options, check, batch=request_file(args, launch))
    if prepared.batch is not None:
        return prepared
    item = check(request)
    checkpoints = open_checkpoints(item, prepared.layout(), launch.rank, launch.world_size,
                                   also_resumable=("format", "fps"))
    return dataclasses.replace(prepared, item=item, checkpoints=checkpoints)


def load(job: Prepared) -> Any:
    """The job's pipeline on this rank's device, parallelised."""
    pipe = build_parallel_pipeline(job)
    pipe.set_progress_bar_config(disable=not is_output_rank(), desc=f"{world_size()} rank(s)")
    return pipe


def generate(job: Prepared, pipe, request: VideoRequest, load_s: float, watch: Watch | None = None) -> dict | None:
    """One video on every rank; the output rank writes the video + JSON and returns the report. The `watch`'s interrupt
    may stop it between steps (RequestCancelled on every rank, nothing written); with its `on_clip`, each clip is
    written on the output rank as soon as it is decoded (`<name>.clip<k>.<format>`) and its path handed on."""
    log = get_logger()
    loaded = time.perf_counter()
    size = f"{request.frames}f_{request.height}x{request.width}"
    stem = output_stem(request, job, size)
    out_dir = Path(request.out_dir)
    options = {} if request.guidance_scale is None else {"guidance_scale": request.guidance_scale}
    if request.negative_prompt:  # else the pipeline's own default (None, or Allegro's "", which it needs)
        options["negative_prompt"] = request.negative_prompt
    clip_files: list[str] = []
    if watch is not None:
        options[WATCH_OPTION] = watch if watch.on_clip is None else dataclasses.replace(
            watch, on_frames=_clip_writer(pipe, request, out_dir / stem, clip_files, watch.on_clip))
    try:
        frames = pipe(
            num_frames=request.frames,
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
        path = save_video(frames[0], out_dir / f"{stem}.{request.format}", request.fps)
        report.update(video=str(path), frames_per_s=request.frames / (generated - loaded),
                      **({"clip_files": clip_files} if clip_files else {}))
        save_json(report, out_dir / f"{stem}.json")
    except BaseException:
        for clip in clip_files:  # a clip is presented only as part of a video that was made
            Path(clip).unlink(missing_ok=True)
        raise
    log.info("wrote %s and %s.json (%d frames in %.2f s: %.2f frames/s)", path, stem, request.frames,
             generated - loaded, report["frames_per_s"])
    return report


def _clip_writer(pipe, request: VideoRequest, stem: Path, written: list[str], on_clip) -> Callable:
    """What the pipeline calls with each decoded clip on the output rank: write it as `<stem>.clip<k>.<format>`, add
    its path to `written`, hand it to `on_clip`."""
    def write(index: int, count: int, frames: torch.Tensor) -> None:
        pixels = pipe.video_processor.postprocess_video(frames, output_type="np")[0]
        path = str(save_video(pixels, stem.with_name(f"{stem.name}.clip{index}.{request.format}"), request.fps))
        written.append(path)
        on_clip(index, count, path)
    return write
