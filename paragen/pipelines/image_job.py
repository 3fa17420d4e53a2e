"""One text-to-image request from the command line: load, parallelise, generate, report, write."""
from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from paragen.comms import is_output_rank, rank_device, world_size
from paragen.log import get_logger
from paragen.parallel import ParallelConfig
from paragen.pipelines.dtypes import check_dtype, resolve_dtype
from paragen.pipelines.checkpoint import RESUMABLE_CHANGES, Checkpoints, first_step, run_fingerprint
from paragen.pipelines.parallelize import parallelize
from paragen.pipelines.loading import load_pipeline
from paragen.pipelines.outputs import save_json, save_png
from paragen.pipelines.report import job_report

@dataclass(frozen=True)
class ImageRequest:
    """Everything `paragen image` was asked for."""

    model: str = "tiny-sd"
    prompt: str = "a lighthouse on a cliff at dusk, oil painting"
    negative_prompt: str = ""
    height: int = 512
    width: int = 512
    steps: int = 20
    guidance_scale: float | None = None  # None: the pipeline's own default
    seed: int = 0
    dtype: str = "auto"  # float32 on CPU, bfloat16/float16 on a GPU
    allow_pickle: bool = False
    out_dir: str = "out"
    name: str | None = None
    checkpoint_dir: str | None = None  # hires runs: save every rank's state here ...
    checkpoint_every: int = 5  # ... every this many steps
    resume: bool = False  # continue the run saved in checkpoint_dir

    def __post_init__(self) -> None:
        for field_name in ("height", "width", "steps"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"{field_name} must be positive, got {getattr(self, field_name)}")
        if self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be positive, got {self.checkpoint_every}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume needs the checkpoint folder of the run to continue")
        check_dtype(self.dtype)

    def output_stem(self, config: ParallelConfig) -> str:
        """File name (without extension) encoding the request and the layout."""
        model = Path(self.model).name if Path(self.model).exists() else self.model
        return self.name or f"{model}_{self.height}x{self.width}_{config.layout_tag()}_seed{self.seed}"


def open_checkpoints(request: ImageRequest, config: ParallelConfig, rank: int, world: int) -> Checkpoints | None:
    """The request's checkpoint folder, checked on this rank before any collective: a fresh run refuses a
    folder holding a checkpoint, a resumed run one saved by a different request, layout or world size."""
    if request.checkpoint_dir is None:
        return None
    if config.hires is None:
        raise ValueError("checkpoints are taken by hires runs (--hires); other image runs are short")
    fingerprint = run_fingerprint(asdict(request), asdict(config.resolve(world)), RESUMABLE_CHANGES)
    checkpoints = Checkpoints(request.checkpoint_dir, fingerprint, rank, world)
    first_step(checkpoints, request.resume)
    return checkpoints


def exact_size_options(pipe) -> dict:
    """Call options that make a pipeline produce exactly the asked size from the prompt as given.

    PixArt snaps sizes to its aspect-ratio bins unless told not to, and cleans captions with optional
    packages (bs4, ftfy) that are not dependencies of paragen.
    """
    accepted = inspect.signature(type(pipe).__call__).parameters
    return {name: False for name in ("use_resolution_binning", "clean_caption") if name in accepted}


def run_image_job(request: ImageRequest, config: ParallelConfig, checkpoints: Checkpoints | None = None) -> dict | None:
    """Generate the image on every rank; the output rank writes PNG + JSON and returns the report.

    `checkpoints` (from `open_checkpoints`, hires only): save every `request.checkpoint_every` steps,
    and continue from the newest complete checkpoint when `request.resume`."""
    log = get_logger()
    start = time.perf_counter()
    pipe = load_pipeline(request.model, dtype=resolve_dtype(request.dtype), device=rank_device(),
                         allow_pickle=request.allow_pickle)
    parallelize(pipe, config)
    if checkpoints is not None:
        pipe.paragen.enable_checkpoints(checkpoints, request.checkpoint_every, request.resume)
    pipe.set_progress_bar_config(disable=not is_output_rank(), desc=f"{world_size()} rank(s)")
    loaded = time.perf_counter()
    options = {} if request.guidance_scale is None else {"guidance_scale": request.guidance_scale}
    images = pipe(
        request.prompt,
        **({"negative_prompt": request.negative_prompt} if request.negative_prompt else {}),  # PixArt rejects None
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        generator=torch.Generator().manual_seed(request.seed),
        **options,
        **exact_size_options(pipe),
    ).images
    generated = time.perf_counter()
    report = job_report("image", asdict(request), pipe, load_s=loaded - start, generate_s=generated - loaded)
    if report is None:
        return None
    runtime = pipe.paragen
    stem = request.output_stem(runtime.config)
    out_dir = Path(request.out_dir)
    image_path = save_png(images[0], out_dir / f"{stem}.png")
    report["image"] = str(image_path)
    save_json(report, out_dir / f"{stem}.json")
    log.info("wrote %s and %s.json (%.2f s, median step %.3f s)", image_path, stem,
             report["timings"]["generate_s"], report["timings"]["step_median_s"] or 0.0)
    return report


__all__ = ["ImageRequest", "exact_size_options", "open_checkpoints", "run_image_job"]
