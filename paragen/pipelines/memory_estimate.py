"""A lower bound of the memory one rank needs for an image or video request, checked before the process group
exists, so that an absurd size is refused in seconds, with the figure and what would fit, instead of allocating
for minutes before an allocator error.

What it counts: tensors that surely exist at the same time on one rank, at the request's dtype, in the phase of
the run that needs most (h × w is the latent, H × W the image, C0 the denoiser's first-level width, Cv the VAE
decoder's full-resolution channels, `batch` 2 where classifier-free guidance batches its branches on each rank):
- always, the whole latent: latent channels × frames × h × w;
- denoising, the term of the request's workload (`Workload.memory`, one of `TERMS`):
- `bands`, a UNet image (patch parallelism): two first-level feature maps of the rank's band (a GroupNorm's
  input and output: batch × C0 × h/patch × w) and, where the first level has self-attention, the attention
  inputs the band gathers: the whole image's (batch × C0 × h × w) in sync and displaced modes, its own in partial;
- `tokens`, a diffusion transformer (sequence parallelism; for a video, clips × token shards of its latent frames):
  the hidden states and their queries, keys and values for the rank's share of the tokens
  (4 × batch × tokens/shards × width; a token is 2 × 2 latent pixels);
- `clips`, a UNet video (clip parallelism): two first-level feature maps of the rank's frames;
- `windows`, hires: nothing more than the latent (the windows are of training size);
- decoding: two full-resolution feature maps of the VAE decoder (2 × Cv × H × W), image rows divided over every
  rank as the parallel decode's bands; a video decodes whole frames, at least one at a time, and its output rank
  gathers every decoded frame (3 × frames × H × W).

And the weights, at the request's dtype, counted from the model's configs (`weight_sizes`): every component whole
on every rank, or with `--shard-weights` the rank's shard of the denoisers and text encoders plus what a running
component holds gathered (its root and two blocks); with `--offload-layers` only what a running component holds.

What it leaves out, so a request that passes can still run out of memory: attention score matrices (fused attention does not materialise
them), halo rows, the stale activations displaced mode keeps for every layer but one, a VAE upcast to float32,
and the allocator's slack. A model whose configs do not say its widths is not checked.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from paragen.log import warn_once
from paragen.parallel import ParallelConfig
from paragen.pipelines.dtypes import resolve_dtype
from paragen.pipelines.model_facts import model_facts
from paragen.pipelines.registry import find
from paragen.pipelines.weight_sizes import WeightSizes, weight_sizes

if TYPE_CHECKING:
    from paragen.pipelines.jobs.image import ImageRequest
    from paragen.pipelines.jobs.video import VideoRequest

# No batched guidance branches: Flux is guidance-distilled (a guidance embedding); Wan calls its transformer once
# per branch, one after the other.
UNBATCHED_GUIDANCE = ("FluxPipeline", "WanPipeline")
DIT_TOKEN_SIDE = 2  # latent pixels per token side: PixArt and SD3 patchify 2 × 2, Flux packs 2 × 2
SIZE_STEP = 8  # latent pixels: suggested sizes are multiples of this (64 pixels for SD), which most layouts split
UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate reads from a diffusers model's configs."""

    transformer: bool  # a diffusion transformer (else a UNet)
    width: int  # UNet: first-level channels; transformer: heads × head width
    first_level_attention: bool  # UNet: whether the first level has self-attention
    distilled: bool  # no classifier-free-guidance batch (guidance embedding or a consistency-distilled UNet)
    vae_channels: int  # the VAE decoder's full-resolution channels
    vae_factor: int  # image pixels per latent pixel along a side
    latent_channels: int
    vae_temporal: int = 1  # video frames per latent frame (Wan's causal 3D VAE: 4)
    pipeline: str = ""  # the pipeline class (with the options, it picks the workload: `registry.find`)


@dataclass(frozen=True)
class Job:
    """One request as the estimate sees it: sizes, dtype and how the ranks share the work."""

    shape: ModelShape
    height: int
    width: int
    frames: int | None  # None: an image
    dtype_bytes: int
    batch: int  # the denoiser's batch on one rank
    split: int  # ranks the denoiser's work is cut over: patch bands, token shards or clips
    ranks: int  # every rank of the job
    gathers_whole_image: bool  # UNet patch attention gathers the whole image's inputs (sync, displaced)
    term: str  # the workload's denoising term (`TERMS`)
    degree: str  # the degrees `split` counts, e.g. `clip × ulysses × ring`
    weights: WeightSizes | None = None  # None: not counted
    shard: bool = False  # the denoisers' and text encoders' weights sharded over the ranks
    offload: bool = False  # their blocks kept in host memory, brought onto the device as they run

    @property
    def weight_bytes(self) -> int:
        """The weights one rank holds on its device at most, in bytes."""
        if self.weights is None:
            return 0
        return self.weights.per_rank(self.ranks, self.shard, self.offload) * self.dtype_bytes


@dataclass(frozen=True)
class Need:
    """A lower bound of one rank's memory, and the part of the run it comes from."""

    bytes: int
    what: str


def model_shape(model: str) -> ModelShape | None:
    """The shape of an embedded or local diffusers model, from its JSON configs; None where they do not say."""
    facts = model_facts(model)
    if facts is None:
        return None
    net, transformer = facts.denoiser_config, facts.denoiser == "transformer"
    try:
        return ModelShape(
            transformer=transformer,
            width=(net["num_attention_heads"] * net["attention_head_dim"] if transformer
                   else net["block_out_channels"][0]),
            first_level_attention=transformer or "CrossAttn" in net["down_block_types"][0],
            distilled=facts.pipeline in UNBATCHED_GUIDANCE or net.get("time_cond_proj_dim") is not None,
            vae_channels=facts.vae.channels,
            vae_factor=facts.vae.factor,
            latent_channels=facts.vae.latent_channels,
            vae_temporal=facts.vae.temporal,
            pipeline=facts.pipeline,
        )
    except (KeyError, IndexError, TypeError):
        return None


def _bands(job: Job, h: int, w: int, latent_frames: int) -> tuple[int, str]:
    band = h // job.split
    attended = (h if job.gathers_whole_image else band) if job.shape.first_level_attention else 0
    return job.batch * job.shape.width * (2 * band + attended) * w, "the UNet's first-level activations"


def _tokens(job: Job, h: int, w: int, latent_frames: int) -> tuple[int, str]:
    tokens = latent_frames * (h // DIT_TOKEN_SIDE) * (w // DIT_TOKEN_SIDE)
    what = "of its share of the video's tokens" if job.frames is not None else "of its tokens"
    return 4 * job.batch * (tokens // job.split) * job.shape.width, f"the transformer's hidden states and Q/K/V {what}"


def _clips(job: Job, h: int, w: int, latent_frames: int) -> tuple[int, str]:
    return (2 * job.batch * job.shape.width * (job.frames // job.split) * h * w,
            "the UNet's first-level activations of its clip")


# A workload's denoising term: (job, latent rows, latent columns, latent frames) -> (elements, what they are).
TERMS: dict[str, Callable[[Job, int, int, int], tuple[int, str]]] = {
    "bands": _bands, "tokens": _tokens, "clips": _clips,
    "windows": lambda job, h, w, latent_frames: (0, "the latent"),
}


def need(job: Job) -> Need:
    """The lower bound the module docstring describes, for one rank (the output rank, for a video)."""
    shape = job.shape
    h, w = job.height // shape.vae_factor, job.width // shape.vae_factor
    frames = job.frames or 1
    latent_frames = (frames - 1) // shape.vae_temporal + 1
    latent = shape.latent_channels * latent_frames * h * w
    denoise = TERMS[job.term](job, h, w, latent_frames)
    decode_rows = job.height if job.frames is not None else job.height // job.ranks
    decode = 2 * shape.vae_channels * decode_rows * job.width, "the VAE decoder's full-resolution feature maps"
    phases = [denoise, decode]
    if job.frames is not None:
        phases.append((3 * frames * job.height * job.width, "the decoded frames gathered on the output rank"))
    elements, what = max(phases)
    activations = (latent + elements) * job.dtype_bytes
    if job.weight_bytes > activations:
        what = "the weights" + (" (offloaded)" if job.offload else " (sharded)" if job.shard else "")
    return Need(activations + job.weight_bytes, what)


def plan_job(shape: ModelShape, request: ImageRequest | VideoRequest, config: ParallelConfig, world: int,
             dtype_bytes: int, options: Any = None) -> Job:
    """The job of an image or video request (a `VideoRequest` has `frames`) under `config` over `world` ranks
    with the workload's `options` (`ExchangeConfig`, `HiresConfig`, `TemporalAttention`)."""
    options = config.legacy_options if options is None else options
    workload = find(shape.pipeline, options)
    resolved = config if config.is_resolved(world) else workload.resolve(config, world)
    guided = not shape.distilled and (request.guidance_scale is None or request.guidance_scale > 1)
    split = math.prod(getattr(resolved, degree) for degree in workload.split)
    return Job(shape=shape, height=request.height, width=request.width, frames=getattr(request, "frames", None),
               dtype_bytes=dtype_bytes, batch=2 if guided and resolved.cfg == 1 else 1, split=split, ranks=world,
               gathers_whole_image=getattr(options, "mode", None) != "partial", term=workload.memory,
               degree=" × ".join(workload.split), weights=weight_sizes(request.model),
               shard=getattr(request, "shard_weights", False), offload=getattr(request, "offload_layers", False))


def available_bytes(device: torch.device, local_ranks: int) -> int | None:
    """Memory this rank can use: the device's free memory on CUDA; on the CPU the host's MemAvailable shared by the
    `local_ranks` ranks on this host. None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 // local_ranks
    return None


def format_bytes(count: float) -> str:
    """`count` bytes in binary units, e.g. `9.3 TiB`, `22 GiB`."""
    unit = 0
    while count >= 1024 and unit < len(UNITS) - 1:
        count, unit = count / 1024, unit + 1
    return f"{count:.{1 if count < 10 else 0}f} {UNITS[unit]}"


def check_memory(request: ImageRequest | VideoRequest, config: ParallelConfig, world: int, device: torch.device,
                 local_ranks: int, options: Any = None) -> None:
    """Refuse (ValueError) a request whose lower-bound need exceeds what this rank's `device` has, naming both and
    what would fit; rank-local, so every rank of a homogeneous node answers alike, before any collective."""
    shape = model_shape(request.model)
    stated = getattr(request, "memory_gib", None)
    available = available_bytes(device, local_ranks) if stated is None else int(stated * 1024**3)
    if shape is None or available is None:
        missing = "its configs do not say its widths" if shape is None else f"the free memory of {device} is unknown"
        warn_once(f"no memory estimate for {request.model}: {missing}; a request too large for a rank fails when "
                  "it allocates")
        return
    job = plan_job(shape, request, config, world, resolve_dtype(request.dtype, device).itemsize, options)
    required = need(job)
    if required.bytes <= available:
        return
    host = f" ({format_bytes(available * local_ranks)} on this host for {local_ranks} ranks)" if local_ranks > 1 else ""
    has = f"--memory-gib gives this rank {format_bytes(available)}" if stated is not None else \
        f"this rank has {format_bytes(available)} available{host}"
    raise ValueError(f"{_describe(job)} needs at least {format_bytes(required.bytes)} per rank with "
                     f"{_layout(job, config)}, mostly {required.what}; {has}; {_what_fits(job, available)}")


def _describe(job: Job) -> str:
    size = f"{job.height}x{job.width}"
    return f"a {size} image" if job.frames is None else f"a video of {job.frames} frames of {size}"


def _layout(job: Job, config: ParallelConfig) -> str:
    ranks = f"{job.ranks} rank{'s' * (job.ranks > 1)}"
    placed = ", weights sharded" * job.shard + ", layers offloaded" * job.offload
    return f"{ranks} ({job.degree} {job.split}{', cfg 2' * (config.cfg == 2)}{placed})"


def _what_fits(job: Job, available: int) -> str:
    """What would fit in `available` bytes: offloaded layers (on one rank, or where nothing else does), sharded
    weights, more ranks for the denoiser's split, a smaller image, fewer frames."""

    def fits(candidate: Job) -> bool:
        return need(candidate).bytes <= available

    ranks_per_split = job.ranks // job.split
    most = job.frames or job.height // job.shape.vae_factor  # at most a clip per frame, a band per latent row
    split = _smallest(job.split + 1, most, lambda s: fits(dataclasses.replace(job, split=s, ranks=s * ranks_per_split)))
    options = []
    if not job.shard and job.weights is not None:
        sharded = dataclasses.replace(job, shard=True)
        if job.ranks > 1 and fits(sharded):
            options.append("--shard-weights")
        else:
            more = _smallest(job.split + 1, most, lambda s: fits(dataclasses.replace(
                sharded, split=s, ranks=s * ranks_per_split)))
            if more is not None and more != split:
                options.append(f"--shard-weights with {job.degree} ≥ {more}")
    if split is not None:
        options.append(f"{job.degree} ≥ {split}")
    if (job.ranks == 1 or not options) and job.weights is not None and not job.offload and fits(
            dataclasses.replace(job, offload=True)):
        options.insert(0, "--offload-layers")
    steps = job.height // (job.shape.vae_factor * SIZE_STEP)
    too_big = _smallest(1, steps, lambda k: not fits(_scaled(job, k)))
    if too_big is not None and too_big > 1:
        small = _scaled(job, too_big - 1)
        options.append(f"at most {small.height}x{small.width}")
    if job.frames is not None:
        too_many = _smallest(job.split, job.frames, lambda f: not fits(dataclasses.replace(job, frames=f)))
        if too_many is not None and too_many > job.split:
            options.append(f"at most {too_many - 1} frames")
    if not options:
        return "neither more ranks nor a smaller size alone would make it fit"
    return f"it would fit with {' or '.join(options)}"


def _scaled(job: Job, steps: int) -> Job:
    """The job `steps` size steps high, its width scaled alike (both whole steps)."""
    step = job.shape.vae_factor * SIZE_STEP
    width = step * max(1, job.width * steps * step // job.height // step)
    return dataclasses.replace(job, height=steps * step, width=width)


def _smallest(low: int, high: int, holds: Callable[[int], bool]) -> int | None:
    """The smallest x in [low, high] where `holds` (false, then true, as x grows) is true; None if it never is."""
    if low > high or not holds(high):
        return None
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if holds(middle) else (middle + 1, high)
    return low


__all__ = ["Job", "ModelShape", "Need", "available_bytes", "check_memory", "format_bytes", "model_shape", "need",
           "plan_job"]
