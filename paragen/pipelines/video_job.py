"""One text-to-video request from the command line: load, parallelise, generate, report, write MP4/GIF."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from paragen.comms import rank_device
from paragen.log import get_logger
from paragen.parallel import ParallelConfig
from paragen.parallel.clip import plan_clips
from paragen.pipelines.checkpoint import RESUMABLE_CHANGES, Checkpoints, first_step, run_fingerprint
from paragen.pipelines.dtypes import check_dtype, resolve_dtype
from paragen.pipelines.loading import load_pipeline
from paragen.pipelines.outputs import VIDEO_FORMATS, mp4_available, save_json, save_video
from paragen.pipelines.parallelize import parallelize
from paragen.pipelines.report import job_report
from paragen.pipelines.video import MAX_FRAMES, MAX_SIDE, VIDEO_PIPELINES, segment_bounds


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

    def output_stem(self, config: ParallelConfig) -> str:
        """File name (without extension) encoding the request and the layout."""
        model = Path(self.model).name if Path(self.model).exists() else self.model
        return self.name or f"{model}_{self.frames}f_{self.height}x{self.width}_{config.layout_tag()}_seed{self.seed}"

    def prompt_options(self) -> dict:
        """The pipeline call's prompt arguments: one prompt, or paragen's per-segment prompts."""
        if len(self.prompts) == 1 and self.segment_frames is None:
            return {"prompt": self.prompts[0]}
        options = {"segment_prompts": list(self.prompts)}
        if self.segment_frames is not None:
            options["segment_frames"] = list(self.segment_frames)
        return options


def check_video_request(request: VideoRequest, config: ParallelConfig, world: int) -> str:
    """What can be checked before the process group exists (the same on every rank); returns the output
    format to write (GIF when MP4 was asked for but imageio-ffmpeg is not installed)."""
    resolved = config.resolve(world)
    plan_clips(request.frames, resolved.clip, resolved.temporal, conv_halo=0)  # the model's own halo: at the call
    if request.format == "mp4" and not mp4_available():
        get_logger().warning("imageio-ffmpeg is not installed (pip install 'paragen[video]'): writing a GIF instead of MP4")
        return "gif"
    return request.format


def open_checkpoints(request: VideoRequest, config: ParallelConfig, rank: int, world: int) -> Checkpoints | None:
    """The request's checkpoint folder, checked on this rank before any collective: a fresh run refuses a
    folder holding a checkpoint, a resumed run one saved by a different request, layout or world size."""
    if request.checkpoint_dir is None:
        return None
    fingerprint = run_fingerprint(asdict(request), asdict(config.resolve(world)), RESUMABLE_CHANGES + ("format", "fps"))
    checkpoints = Checkpoints(request.checkpoint_dir, fingerprint, rank, world)
    first_step(checkpoints, request.resume)
    return checkpoints


def run_video_job(request: VideoRequest, config: ParallelConfig, checkpoints: Checkpoints | None = None,
                  video_format: str | None = None) -> dict | None:
    """Generate the video on every rank; the output rank writes the video + JSON and returns the report."""
    log = get_logger()
    start = time.perf_counter()
    pipe = load_pipeline(request.model, dtype=resolve_dtype(request.dtype), device=rank_device(),
                         allow_pickle=request.allow_pickle)
    if type(pipe).__name__ not in VIDEO_PIPELINES:
        raise TypeError(f"paragen video runs {', '.join(VIDEO_PIPELINES)}; {request.model} is a {type(pipe).__name__}")
    parallelize(pipe, config)
    if checkpoints is not None:
        pipe.paragen.enable_checkpoints(checkpoints, request.checkpoint_every, request.resume)
    pipe.set_progress_bar_config(disable=pipe.paragen.comm.rank != 0, desc=f"{pipe.paragen.comm.size} clip(s)")
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
    report = job_report("video", asdict(request), pipe, load_s=loaded - start, generate_s=generated - loaded)
    if report is None:
        return None
    fmt = video_format or request.format
    stem = request.output_stem(pipe.paragen.config)
    out_dir = Path(request.out_dir)
    path = save_video(frames[0], out_dir / f"{stem}.{fmt}", request.fps)
    report.update(video=str(path), frames_per_s=request.frames / (generated - loaded))
    save_json(report, out_dir / f"{stem}.json")
    log.info("wrote %s and %s.json (%d frames in %.2f s: %.2f frames/s)", path, stem, request.frames,
             generated - loaded, report["frames_per_s"])
    return report


__all__ = ["VideoRequest", "check_video_request", "open_checkpoints", "run_video_job"]
