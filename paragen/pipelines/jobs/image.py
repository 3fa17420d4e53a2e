"""`paragen image`: one text-to-image request — check, load, parallelise, generate, report, write.

The model's pipeline class and `--hires` pick the workload (`registry.find`): UNet patch parallelism,
DiT sequence parallelism, or hires windows.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from paragen.comms import is_output_rank, world_size
from paragen.log import get_logger
from paragen.parallel.config import MODE_HELP, MODES, ExchangeConfig
from paragen.parallel.hires import GUIDANCE_MODES, PLACEMENTS, HiresConfig
from paragen.pipelines import registry
from paragen.pipelines.dtypes import DtypeName
from paragen.pipelines.jobs import fields, schema
from paragen.pipelines.jobs.batch import request_file
from paragen.pipelines.jobs.plan import add_layout_argument, chosen_layout
from paragen.pipelines.jobs.common import (Prepared, add_cache_arguments, add_checkpoint_arguments,
                                           add_memory_arguments, add_output_arguments, build_parallel_pipeline,
                                           check_room, checkpoint_folder, fit_to_model, open_checkpoints, output_stem,
                                           step_cache_config)
from paragen.pipelines.jobs.schema import field, request_class
from paragen.pipelines.loading import EMBEDDED_MODELS, check_model_source
from paragen.parallel.batch_invariant import requests_in_call
from paragen.parallel.interrupt import Watch
from paragen.pipelines.outputs import save_json, save_png
from paragen.pipelines.runtime import WATCH_OPTION
from paragen.pipelines.report import job_report


@request_class
class ImageRequest:
    """Everything `paragen image` was asked for: one declaration per field (see `schema`)."""

    model: str = fields.model("tiny-sd", f"embedded model name ({', '.join(EMBEDDED_MODELS)}) , a local "
                                         "diffusers directory (safetensors), or a Hugging Face Hub id org/name[@revision] "
                                         "(fetched into the hub cache)")
    prompt: str = field("a lighthouse on a cliff at dusk, oil painting", "text prompt", min_length=1)
    negative_prompt: str = fields.negative_prompt()
    height: int | None = fields.side("height", "image")
    width: int | None = fields.side("width", "image")
    steps: int = fields.steps()
    guidance_scale: float | None = fields.guidance_scale("guidance scale (classifier-free; Flux: its guidance "
                                                         "embedding)")
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
    out_dir: str = fields.out_dir("the PNG and the JSON run report")
    name: str | None = fields.name()
    checkpoint_dir: str | None = fields.checkpoint_dir()  # hires runs
    checkpoint_every: int = fields.checkpoint_every(5)
    resume: bool = fields.resume()

    def __post_init__(self) -> None:
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume needs the checkpoint folder of the run to continue")


REQUEST = ImageRequest  # what `paragen plan image` builds from the same options
REQUEST_OPTIONS = ("model", "prompt", "negative_prompt", "height", "width", "steps", "guidance_scale", "seed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `paragen image`."""
    hires_defaults, exchange = HiresConfig(), ExchangeConfig()
    p.description = "Generate one image with its work split across every rank of the job."
    schema.add_arguments(p, ImageRequest, REQUEST_OPTIONS)
    registry.add_degree_arguments(p, "image")
    add_layout_argument(p)
    p.add_argument("--mode", choices=MODES, default=exchange.mode,
                   help="; ".join(f"{m}: {text}" for m, text in MODE_HELP.items()))
    p.add_argument("--warmup-steps", type=int, default=exchange.warmup_steps,
                   help="the first N denoising steps of a request run exact (sync) before displaced/partial start "
                   "using stale data (DistriFusion's warmup_steps=k means k+1 exact steps)")
    p.add_argument("--partial-fraction", type=float, default=exchange.partial_fraction,
                   help="partial mode: fraction of each neighbouring band's rows that attention sees")
    h = p.add_argument_group("beyond the training size (--hires, SD/SDXL)")
    h.add_argument("--hires", action="store_true",
                   help="denoise training-size windows spread over the ranks, steered by a low-resolution view")
    h.add_argument("--window", type=int, default=None, help="window side in latent pixels (default: the UNet's sample_size)")
    h.add_argument("--stride", type=int, default=None, help="latent pixels between windows (default: half the window)")
    h.add_argument("--guidance", choices=GUIDANCE_MODES, default="async",
                   help="async: mix in the previous step's low-resolution guidance (no waiting); sync: wait for this step's")
    h.add_argument("--guidance-weight", type=float, default=hires_defaults.guidance_weight,
                   help="structure guidance weight w0, in [0, 1]")
    h.add_argument("--guidance-decay", type=float, default=hires_defaults.guidance_decay,
                   help="exponent of the cosine decay of the weight over the steps (0: constant)")
    h.add_argument("--map-layers", default=",".join(hires_defaults.map_layers),
                   help="comma-separated UNet module prefixes whose cross-attention maps form the guidance mask")
    h.add_argument("--structure-fraction", type=float, default=hires_defaults.structure_fraction,
                   help="share of the steps run at low resolution before it seeds the large latent (0: none)")
    h.add_argument("--placement", choices=PLACEMENTS, default=hires_defaults.placement,
                   help="interleaved: the low-resolution pass is one more unit of a window rank; dedicated: a rank of its own")
    h.add_argument("--window-batch", type=int, default=hires_defaults.window_batch, help="windows per UNet call")
    add_checkpoint_arguments(h, ImageRequest)
    add_memory_arguments(p, ImageRequest)
    add_cache_arguments(p, ImageRequest)
    add_output_arguments(p, ImageRequest)


def _options(args: argparse.Namespace) -> ExchangeConfig | HiresConfig:
    """The workload options the flags ask for: `HiresConfig` with --hires, else `ExchangeConfig`."""
    if not args.hires:
        given = [flag for flag, value in (("--window", args.window), ("--stride", args.stride)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --hires")
        return ExchangeConfig(mode=args.mode, warmup_steps=args.warmup_steps, partial_fraction=args.partial_fraction)
    if args.mode != "sync":
        raise ValueError("hires spreads the windows of one image over every rank; it does not take a displaced or "
                         "partial mode (its own option is --guidance async|sync)")
    return HiresConfig(
        window=args.window, stride=args.stride, guidance=args.guidance, guidance_weight=args.guidance_weight,
        guidance_decay=args.guidance_decay, map_layers=tuple(p.strip() for p in args.map_layers.split(",") if p.strip()),
        structure_fraction=args.structure_fraction, placement=args.placement, window_batch=args.window_batch,
    )


def prepare(args: argparse.Namespace, launch) -> Prepared:
    """Every check of the request that needs no other rank, on every rank, before the process group."""
    request = schema.from_arguments(ImageRequest, args, checkpoint_dir=checkpoint_folder(args),
                                    resume=args.resume is not None)
    options = _options(args)
    class_name = check_model_source(args.model, allow_pickle=args.allow_pickle)
    workload, config, options = chosen_layout(args, "image", class_name, request, launch, options)
    workload.check_weight_sharding(request.shard_weights, launch.world_size)
    step_cache_config(request, options)  # refused here, before the process group, if it cannot run
    if request.checkpoint_dir is not None and not workload.checkpoints:
        raise ValueError(f"{workload.name} runs take no checkpoints (hires runs do: --hires); they are short")

    def check(one: ImageRequest) -> ImageRequest:
        """The request as it runs: at the model's own size where it gives none, and fitting this rank."""
        one = fit_to_model(one)
        workload.check_request(one, config, options)
        check_room(args, one, config, launch, options)
        return one

    prepared = Prepared(request, workload, config, options, check, batch=request_file(args, launch))
    if prepared.batch is not None:
        return prepared
    item = check(request)
    checkpoints = open_checkpoints(item, prepared.layout(), launch.rank, launch.world_size)
    return dataclasses.replace(prepared, item=item, checkpoints=checkpoints)


def exact_size_options(pipe) -> dict:
    """Call options that make a pipeline produce exactly the asked size from the prompt as given.

    PixArt snaps sizes to its aspect-ratio bins unless told not to, and cleans captions with optional
    packages (bs4, ftfy) that are not dependencies of paragen.
    """
    accepted = inspect.signature(type(pipe).__call__).parameters
    return {name: False for name in ("use_resolution_binning", "clean_caption") if name in accepted}


def load(job: Prepared) -> Any:
    """The job's pipeline on this rank's device, parallelised."""
    pipe = build_parallel_pipeline(job)
    pipe.set_progress_bar_config(disable=not is_output_rank(), desc=f"{world_size()} rank(s)")
    return pipe


BATCH_VARIES = ("prompt", "seed", "name")  # what the requests of one batch may differ in


def batch_key(job: Prepared, request: ImageRequest) -> tuple | None:
    """Requests with equal keys can share the denoiser's forwards: everything but their prompt, seed and name; None
    where the job makes each request alone (hires: its windows are spread over the ranks one image at a time)."""
    if isinstance(job.options, HiresConfig):
        return None
    return tuple(sorted((name, value) for name, value in asdict(request).items() if name not in BATCH_VARIES))


def generate(job: Prepared, pipe, request: ImageRequest, load_s: float, watch: Watch | None = None) -> dict | None:
    """One image on every rank; the output rank writes PNG + JSON and returns the report. The `watch`'s interrupt may
    stop it between steps (RequestCancelled on every rank, nothing written)."""
    reports = generate_batch(job, pipe, [request], load_s, watch)
    return None if reports is None else reports[0]


def generate_batch(job: Prepared, pipe, requests: list[ImageRequest], load_s: float,
                   watch: Watch | None = None) -> list[dict] | None:
    """Images for `requests` (equal `batch_key`s) in one pipeline call on every rank, each from its own prompt and
    seed; the output rank writes each PNG + JSON and returns their reports (None on the others). The `watch` may stop
    them between steps (RequestCancelled on every rank, nothing written)."""
    log = get_logger()
    first = requests[0]
    one = len(requests) == 1  # a batch of one is called as a single request (a prompt, a generator)
    if not one and (batch_key(job, first) is None or any(batch_key(job, r) != batch_key(job, first) for r in requests)):
        raise ValueError("a batch's requests must differ only in their prompt, seed and name, in a job that batches")
    loaded = time.perf_counter()
    options = {} if first.guidance_scale is None else {"guidance_scale": first.guidance_scale}
    if watch is not None:
        options[WATCH_OPTION] = watch
    prompts = [request.prompt for request in requests]
    generators = [torch.Generator().manual_seed(request.seed) for request in requests]
    with requests_in_call(len(requests)):
        images = pipe(
            prompt=prompts[0] if one else prompts,  # by name: FLUX.2's call takes an image first
            **({"negative_prompt": first.negative_prompt if one else [first.negative_prompt] * len(requests)}
               if first.negative_prompt else {}),  # PixArt rejects None
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            generator=generators[0] if one else generators,
            **options,
            **exact_size_options(pipe),
        ).images
    generated = time.perf_counter()
    shared = job_report("image", asdict(first), pipe, job.workload, job.options, load_s=load_s,
                        generate_s=generated - loaded)
    if shared is None:
        return None
    reports = [{**shared, "request": asdict(request), **({} if one else {"batch": {"size": len(requests),
                                                                                   "index": index}})}
               for index, request in enumerate(requests)]
    for image, request, report in zip(images, requests, reports):
        stem = output_stem(request, job, f"{request.height}x{request.width}")
        out_dir = Path(request.out_dir)
        image_path = save_png(image, out_dir / f"{stem}.png")
        report["image"] = str(image_path)
        save_json(report, out_dir / f"{stem}.json")
        log.info("wrote %s and %s.json (%.2f s, median step %.3f s)", image_path, stem,
                 report["timings"]["generate_s"], report["timings"]["step_median_s"] or 0.0)
    return reports
