"""The workloads: what each one parallelises, which degrees it splits by, its options, its package, its job.

A workload is a package under `paragen/pipelines/` whose `__init__` exports
- `check(model, config, options)`: refuse what it cannot run (same answer on every rank, no collective);
- `install(model, config, options)`: make `model` parallel in place, with `config` resolved;
- optionally `check_request(request, config, options)`: refuse a job's request before the model is loaded (what
  the model's own call checks needs no such hook);
and one `Workload` record here. `paragen.parallelize`, the command line and the benchmarks all go through
`find` and `Workload.parallelize`; adding a workload is adding its package and its record.

A command-line job (`paragen image`, `paragen video`, `paragen llm`; `paragen/pipelines/jobs/`) is a module
exporting `add_arguments` (its parser), `prepare` (every check of a request, before the process group), `load`
(the model, parallelised) and `generate` (one request), and may export `standalone` (what it answers without the
ranks, such as `paragen llm --print-prompt`); it picks its workload with `find`, so one job runs every workload that
names it. `jobs.batch.run_job` runs a prepared job, one request or a whole request file.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from paragen.comms import rank_device, world_size
from paragen.parallel.clip import TemporalAttention
from paragen.parallel.config import ExchangeConfig, ParallelConfig
from paragen.parallel.hires import HiresConfig
from paragen.parallel.llm.config import KVConfig

UNET_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
DIT_PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
                 "Flux2Pipeline", "Flux2KleinPipeline", "QwenImagePipeline", "ZImagePipeline",
                 "HunyuanDiTPipeline", "AuraFlowPipeline", "Lumina2Pipeline", "SanaPipeline")
VIDEO_PIPELINES = ("TextToVideoSDPipeline", "AnimateDiffPipeline")
VIDEO_DIT_PIPELINES = ("WanPipeline",)
TOKEN_VIDEO_PIPELINES = ("LTXPipeline", "CogVideoXPipeline", "HunyuanVideoPipeline", "MochiPipeline",
                         "AllegroPipeline", "HeliosPipeline", "LTX2Pipeline")
CAUSAL_LMS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True)
class Workload:
    """One way of cutting a request over the ranks."""

    name: str
    accepts: tuple[str, ...]  # class names of the pipelines or models it parallelises
    options: type  # its options' type; passing an instance selects this workload
    degrees: tuple[str, ...]  # the ParallelConfig degrees it splits by
    fill: str  # the degree that takes the ranks the others leave
    package: str  # exports check(model, config, options) and install(model, config, options)
    job: str  # the command-line job that runs it (a key of `JOBS`)
    options_name: str  # its options' key in reports and checkpoint fingerprints
    refusal: str  # why the degrees it does not split by do not apply
    checkpoints: bool = False  # its runs save every rank's state every K steps (--checkpoint) and resume from it
    modes: tuple[str, ...] = ()  # the ways it runs (`paragen models`)
    sharding_plans: bool = False  # its denoiser is cut by a sharding plan (`paragen/pipelines/dit/plans.py`)
    degree_help: Mapping[str, str] = field(default_factory=dict)  # what each of its degrees cuts (`--<degree>` help)
    # its outputs' layout in file names: these degrees, in this order (`label=degree`: named `label`; a leading `?`:
    # named only above 1), then its options' `tag`
    tag: tuple[str, ...] = ()
    memory: str | None = None  # its denoiser's term of the memory estimate (`memory_estimate.TERMS`)
    # why its weights cannot be sharded over the ranks (None: they can, `--shard-weights`)
    no_weight_sharding: str | None = None
    planned: bool = True  # `paragen plan` and `--layout auto` weigh its layouts (hires changes what is computed)

    @property
    def split(self) -> tuple[str, ...]:
        """The degrees that cut its denoiser's work (all but the guidance branches)."""
        return tuple(d for d in self.degrees if d != "cfg")

    def name_tag(self, config: ParallelConfig, options: Any) -> str:
        """The file-name fragment of a run under the resolved `config`, e.g. `patch4_cfg2_displaced`,
        `ulysses2_cfg1_sync`, `clip2_ring2_dual`."""
        parts = []
        for entry in self.tag:
            label, _, degree = entry.lstrip("?").partition("=")
            value = getattr(config, degree or label)
            if not entry.startswith("?") or value > 1:
                parts.append(f"{label}{value}")
        return "_".join([*parts, options.tag])

    def resolve(self, config: ParallelConfig | None, world: int | None = None) -> ParallelConfig:
        """`config` with every degree concrete for `world` ranks (default: the job's), by this workload's degrees."""
        world = world_size() if world is None else world
        return (config or ParallelConfig()).resolve(world, self.degrees, self.fill, self.refusal)

    def check(self, model: Any, config: ParallelConfig, options: Any) -> None:
        """The workload's own checks of `model` and `options` under the resolved `config` (no collective)."""
        importlib.import_module(self.package).check(model, config, options)

    def check_request(self, request: Any, config: ParallelConfig, options: Any) -> None:
        """The workload's checks of one job request before its model is loaded (its package's `check_request`,
        where it has one)."""
        check = getattr(importlib.import_module(self.package), "check_request", None)
        if check is not None:
            check(request, config, options)

    def install(self, model: Any, config: ParallelConfig, options: Any) -> Any:
        """Make `model` parallel in place under the resolved `config` (checked: see `check`)."""
        return importlib.import_module(self.package).install(model, config, options)

    def check_weight_sharding(self, shard: bool, world: int | None = None) -> None:
        """Refuse sharded weights on one rank (`world`, default: the job's), and where this workload's ranks do not
        run its models alike."""
        if not shard:
            return
        if (world_size() if world is None else world) == 1:
            raise ValueError("--shard-weights shares the weights among the ranks; with one rank there is nobody to "
                             "share them with (start several, e.g. torchrun --nproc-per-node 2)")
        if self.no_weight_sharding:
            raise ValueError(f"{self.name} runs cannot shard their weights: {self.no_weight_sharding}")

    def parallelize(self, model: Any, config: ParallelConfig | None, options: Any, shard_weights: bool = False,
                    offload_layers: bool = False) -> Any:
        """Resolve, check, install, and shard or offload the weights if asked (`parallel.placement`; weights placed
        already, as a job's loader does, stay as they are): the whole of `paragen.parallelize` once the workload is
        known."""
        resolved = self.resolve(config)
        options = self.options() if options is None else options
        self.check_weight_sharding(shard_weights)
        self.check(model, resolved, options)
        installed = self.install(model, resolved, options)
        if shard_weights or offload_layers:
            from paragen.parallel.placement import place_pipeline_weights

            place_pipeline_weights(model, rank_device(), shard_weights, offload_layers)
        return installed


_CFG = "2: the conditional and unconditional branches run on different halves of the ranks"
_ULYSSES = "Ulysses degree (all-to-all to head shards; must divide the head count)"
_RING = "Ring degree (K/V passed around a ring)"
_VIDEO_DIT = dict(
    degree_help={"cfg": f"video transformers: {_CFG}", "clip": "video transformers: clips of the latent frames",
                 "ulysses": f"video transformers: {_ULYSSES}", "ring": f"video transformers: {_RING}"},
    tag=("clip", "?ulysses", "?ring", "?cfg"), memory="tokens", checkpoints=True, sharding_plans=True)
WORKLOADS = (
    Workload("patch", UNET_PIPELINES, ExchangeConfig, ("cfg", "patch"), "patch", "paragen.pipelines.patch", "image",
             "exchange", "ulysses and ring shard a diffusion transformer's tokens; a UNet pipeline is split with patch "
             "(and cfg)", modes=("sync", "displaced", "partial"),
             degree_help={"cfg": _CFG, "patch": "UNet models: row bands of the latent"}, tag=("patch", "cfg"),
             memory="bands"),
    Workload("hires", UNET_PIPELINES, HiresConfig, ("patch",), "patch", "paragen.pipelines.hires", "image", "hires",
             "hires spreads the windows of one image over every rank (patch); it does not combine with cfg=2, "
             "ulysses, ring, clip, seq or tp", checkpoints=True, modes=("windows", "low-resolution structure guidance"),
             degree_help={"patch": "--hires: the ranks sharing the windows"}, tag=("hires=patch",), memory="windows",
             no_weight_sharding="its ranks run different numbers of windows, and every rank would have to gather "
                                "each block's weights as often as the others", planned=False),
    Workload("dit", DIT_PIPELINES, ExchangeConfig, ("cfg", "ulysses", "ring"), "ring", "paragen.pipelines.dit", "image",
             "exchange", "diffusion transformers are split along the token sequence; use ulysses and ring (and cfg)",
             modes=("sync", "displaced"), sharding_plans=True,
             degree_help={"cfg": _CFG, "ulysses": f"DiT models: {_ULYSSES}", "ring": f"DiT models: {_RING}"},
             tag=("?ulysses", "?ring", "cfg"), memory="tokens"),
    Workload("video", VIDEO_PIPELINES, TemporalAttention, ("clip",), "clip", "paragen.pipelines.video", "video",
             "temporal", "video pipelines split the frames into clips (clip=N); cfg=2, patch, ulysses, ring, seq "
             "and tp do not apply", checkpoints=True, modes=("clips: dual scope", "clips: full scope", "segment prompts"),
             degree_help={"clip": "UNet video models: clips of the frames"}, tag=("clip",), memory="clips"),
    Workload("wan", VIDEO_DIT_PIPELINES, TemporalAttention, ("cfg", "clip", "ulysses", "ring"), "ring",
             "paragen.pipelines.wan", "video", "temporal", "video diffusion transformers split the latent frames into "
             "clips and each clip's tokens into sequence shards; use clip, ulysses and ring (and cfg)",
             modes=("sync", "clips: dual scope", "clips: full scope", "segment prompts"), **_VIDEO_DIT),
    Workload("dit-video", TOKEN_VIDEO_PIPELINES, TemporalAttention, ("cfg", "clip", "ulysses", "ring"), "ring",
             "paragen.pipelines.dit", "video", "temporal", "video diffusion transformers split the latent frames into "
             "clips and each clip's tokens into sequence shards; use clip, ulysses and ring (and cfg)",
             modes=("sync", "clips: dual scope", "clips: full scope"), **_VIDEO_DIT),
    Workload("llm", CAUSAL_LMS, KVConfig, ("seq", "tp"), "seq", "paragen.pipelines.llm", "llm", "kv",
             "seq and tp cut a causal LM's prompt and weights; they do not combine with cfg, patch, ulysses, ring "
             "or clip", modes=("dense", "offload (ShadowKV)", "speculative (TriForce)"),
             degree_help={"seq": "sequence shards of the prompt",
                          "tp": "tensor-parallel ranks per shard (DeepSpeed AutoTP)"},
             tag=("seq", "tp"), no_weight_sharding="a causal LM's weights are cut with tp (tensor parallelism)"),
)
DEGREE_CHOICES = {"cfg": (1, 2)}  # degrees that take only these values
# Command-line jobs: name -> (module, one-line help). The help is here so that `paragen --help` and
# `paragen slurm` import no job (and no diffusers).
JOBS = {
    "image": ("paragen.pipelines.jobs.image",
              "text-to-image across ranks (patch parallelism for UNets, sequence parallelism for DiTs, hires windows)"),
    "video": ("paragen.pipelines.jobs.video",
              "text-to-video across ranks (clip parallelism with dual-scope temporal attention for UNet video models, "
              "token shards for Wan)"),
    "llm": ("paragen.pipelines.jobs.llm",
            "long-context causal-LM generation across ranks (sequence-sharded prefill and KV cache)"),
}


def job_workloads(job: str) -> tuple[Workload, ...]:
    """The workloads command-line job `job` runs."""
    return tuple(w for w in WORKLOADS if w.job == job)


def job_degrees(job: str) -> tuple[str, ...]:
    """The degrees any workload of `job` splits by, in the order its workloads declare them."""
    return tuple(dict.fromkeys(d for w in job_workloads(job) for d in w.degrees))


def add_degree_arguments(parser: argparse.ArgumentParser, job: str) -> None:
    """`--<degree>` for every degree of `job`, its help what each workload cuts by it; -1 (the ranks left over) is
    the default of a degree some workload fills, 1 of the others."""
    for degree in job_degrees(job):
        takers = [w for w in job_workloads(job) if degree in w.degrees]
        text = "; ".join(dict.fromkeys(w.degree_help.get(degree, w.name) for w in takers))
        fills = [w for w in takers if w.fill == degree]
        if fills:
            names = ", ".join(w.name for w in fills)
            which = f", for workload{'s' * (len(fills) > 1)} {names}" if len(fills) < len(takers) else ""
            text += f" (-1: the ranks left over{which})"
        parser.add_argument(f"--{degree}", type=int, default=-1 if fills else 1, choices=DEGREE_CHOICES.get(degree),
                            help=text)


def degrees_of(args: argparse.Namespace, job: str) -> ParallelConfig:
    """The `ParallelConfig` a job's command line asks for (`add_degree_arguments`)."""
    return ParallelConfig(**{degree: getattr(args, degree) for degree in job_degrees(job)})


def find(class_name: str, options: Any = None, workloads: tuple[Workload, ...] = WORKLOADS) -> Workload:
    """The workload for a pipeline or model class and an options object (None: the class's first workload).

    TypeError, naming what is supported, when no workload takes the class or none takes these options.
    """
    takers = [w for w in workloads if class_name in w.accepts]
    if not takers:
        supported = [name for w in workloads for name in w.accepts]
        raise TypeError(f"paragen.parallelize supports {', '.join(dict.fromkeys(supported))}; got {class_name}")
    if options is None:
        return takers[0]
    for workload in takers:
        if isinstance(options, workload.options):
            return workload
    fitting = [w for w in workloads if isinstance(options, w.options)]
    if fitting:
        names = [w.name for w in fitting]
        names = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        accepted = ", ".join(dict.fromkeys(name for w in fitting for name in w.accepts))
        verb = "supports" if len(fitting) == 1 else "support"
        raise TypeError(f"{names} {verb} {accepted}; got {class_name} (with {type(options).__name__} options)")
    kinds = ", ".join(dict.fromkeys(w.options.__name__ for w in takers))
    raise TypeError(f"{class_name} takes options of type {kinds}; got {type(options).__name__}")


def find_for_job(job: str, class_name: str, options: Any, model: str) -> Workload:
    """The workload of job `job` for `model` (whose class is `class_name`) and `options`; TypeError naming what
    the job runs when `model` belongs to another job."""
    mine = job_workloads(job)
    if not any(class_name in w.accepts for w in mine):
        accepted = ", ".join(dict.fromkeys(name for w in mine for name in w.accepts))
        raise TypeError(f"paragen {job} runs {accepted}; {model} is a {class_name}")
    return find(class_name, options, mine)


def parallelize(model: Any, config: ParallelConfig | None = None, options: Any = None, *,
                shard_weights: bool = False, offload_layers: bool = False) -> Any:
    """Make a diffusers pipeline or a causal LM run each request across all ranks, in place, and return it.

    Call `paragen.init()` first. Every rank builds the same model (same weights) and calls it with the
    same arguments; each computes its share, and every rank returns the whole result. `config` holds the
    parallel degrees; `options` selects and configures the workload:
    - SD, SDXL: row bands (`patch`, `cfg`) with `ExchangeConfig` (sync, displaced, partial), or beyond
      the training size with `HiresConfig` (windows over the ranks, low-resolution structure guidance);
    - diffusion transformers with a sharding plan (PixArt, SD3, Flux, FLUX.2, Qwen-Image, Z-Image; `paragen models`):
      token shards (`ulysses`, `ring`, `cfg`) with `ExchangeConfig` (sync, displaced);
    - TextToVideoSD, AnimateDiff: clips of frames (`clip`) with `TemporalAttention`;
    - Wan, LTX-Video, CogVideoX, HunyuanVideo, Mochi: clips of latent frames (`clip`), each clip's tokens in shards
      (`ulysses`, `ring`), and `cfg`, with `TemporalAttention` (what a clip sees of the others);
    - Llama, Qwen2, Mistral: prompt shards and weight shards (`seq`, `tp`) with `KVConfig`; each request
      takes a cache from `model.paragen.new_cache()`.
    `shard_weights=True` shards the denoisers' and text encoders' weights over all ranks (`paragen.parallel.weights`):
    each rank keeps about 1/N of them and gathers each block's just before it runs. `offload_layers=True` keeps their
    blocks (or shards) in host memory and brings each onto the device just before it runs (`paragen.parallel.offload`).
    """
    if hasattr(model, "paragen"):
        raise ValueError(f"this {type(model).__name__} is already parallelised")
    if options is None and config is not None:
        options = config.legacy_options
    return find(type(model).__name__, options).parallelize(model, config, options, shard_weights, offload_layers)
