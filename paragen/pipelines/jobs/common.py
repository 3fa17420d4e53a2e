"""What every job shares: the prepared job, the request fields the jobs have in common (declared once, see
`schema`), output and checkpoint options, fitting a request to its model, the room check, checkpoints."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any, Callable

from paragen.comms import rank_device, resolve_device
from paragen.parallel.batch_invariant import make_batch_invariant
from paragen.parallel.config import ParallelConfig
from paragen.parallel.step_cache import StepCacheConfig, check_step_cache
from paragen.pipelines.checkpoint import RESUMABLE_CHANGES, Checkpoints, StepCheckpoints, run_fingerprint
from paragen.pipelines.dtypes import resolve_dtype
from paragen.pipelines.jobs import schema
from paragen.pipelines.loading import build_pipeline
from paragen.pipelines.sources import display_name
from paragen.pipelines.model_facts import model_facts
from paragen.pipelines.registry import Workload
from paragen.pipelines.step_cache import enable_step_cache

OUTPUT_FIELDS = ("dtype", "allow_pickle", "out_dir", "name")
CACHE_FIELDS = ("cache", "cache_threshold", "cache_interval", "cache_order", "cache_start")  # the step cache's
MEMORY_FIELDS = ("shard_weights", "offload_layers", "memory_gib")  # an image or video job's: where its weights live, what it may use


@dataclass(frozen=True)
class Prepared:
    """A job's checked request(s), ready to run once the process group exists."""

    request: Any  # the command line's request
    workload: Workload
    config: ParallelConfig  # resolved
    options: Any  # the workload's options
    check: Callable[[Any], Any]  # one request's checks on this rank; returns it as the job's `generate` takes it
    item: Any = None  # the single request, checked (None with a request file)
    batch: Any = None  # --requests: where the file is and how to take it (a `jobs.batch.RequestFile`)
    checkpoints: StepCheckpoints | None = None
    content: Callable[[Any], str] | None = None  # what a checked item computes on (its token ids), where a rank's
    # own files feed it; the ranks compare it (`agree.same_everywhere`)
    batch_invariant: bool = False  # a server that batches requests: outputs per sample independent of the batch

    def layout(self) -> dict:
        """The resolved degrees and the workload's options: with the request, what makes the outputs."""
        return {**asdict(self.config), self.workload.options_name: asdict(self.options)}


def add_output_arguments(p: argparse.ArgumentParser, request_class: type) -> None:
    """--dtype, --allow-pickle, --out and --name (from the request's fields), --requests and --strict."""
    schema.add_arguments(p, request_class, OUTPUT_FIELDS)
    p.add_argument("--requests", default=None, metavar="FILE.jsonl",
                   help="many requests, one JSON object per line (its fields override the command line's; its 'id' "
                        "names its outputs); the model is loaded once; a rerun skips what the output folder's "
                        "journal records as done")
    p.add_argument("--strict", action="store_true", help="with --requests: stop at the first refused line")


def add_memory_arguments(p: argparse.ArgumentParser, request_class: type) -> None:
    """--shard-weights, --offload-layers and --memory-gib (the request's fields)."""
    schema.add_arguments(p, request_class, MEMORY_FIELDS)


def add_cache_arguments(p: argparse.ArgumentParser, request_class: type) -> None:
    """--cache and its settings (the request's fields)."""
    schema.add_arguments(p, request_class, CACHE_FIELDS)


def step_cache_config(request: Any, options: Any) -> StepCacheConfig:
    """The step cache an image or video request asks for, checked against the workload's `options`."""
    config = StepCacheConfig(request.cache, request.cache_threshold, request.cache_interval, request.cache_order,
                             request.cache_start)
    check_step_cache(config, options)
    return config


def add_checkpoint_arguments(p, request_class: type) -> None:
    """--checkpoint, --checkpoint-every (the request's field), --resume."""
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="save every rank's state in DIR every --checkpoint-every steps (must not hold a checkpoint)")
    schema.add_arguments(p, request_class, ("checkpoint_every",))
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run checkpointed in DIR (same request, layout and number of ranks)")


def checkpoint_folder(args: argparse.Namespace) -> str | None:
    """The folder of --checkpoint / --resume (a resumed run keeps checkpointing where it was)."""
    if args.resume and args.checkpoint and args.resume != args.checkpoint:
        raise ValueError("--resume continues the run in its folder and keeps checkpointing there; drop --checkpoint")
    return args.resume or args.checkpoint


def fit_to_model(request: Any) -> Any:
    """`request` with the pipeline's own size (and frames) where it gives none; refuses more steps than the model's
    scheduler has training timesteps. The same answer on every rank (it reads the model's configs)."""
    facts = model_facts(request.model)
    wanted = [name for name in ("height", "width", "frames") if getattr(request, name, 0) is None]
    if facts is not None and facts.train_timesteps and request.steps > facts.train_timesteps:
        raise ValueError(f"steps {request.steps}: the scheduler of {request.model} was trained on "
                         f"{facts.train_timesteps} timesteps, so at most {facts.train_timesteps} steps")
    defaults = {"height": facts.height, "width": facts.width, "frames": facts.frames} if facts is not None else {}
    missing = [name for name in wanted if defaults.get(name) is None]
    if missing:
        raise ValueError(f"paragen cannot read the default {' and '.join(missing)} of {request.model} from its "
                         "configs: give " + " and ".join(f"--{name}" for name in missing))
    return schema.replace(request, **{name: defaults[name] for name in wanted}) if wanted else request


def check_room(args: argparse.Namespace, request, config: ParallelConfig, launch, options: Any) -> None:
    """An image or video request's output folder and its memory per rank (resolved `config`, workload `options`)."""
    from paragen.pipelines.memory_estimate import check_memory
    from paragen.pipelines.outputs import check_out_dir

    check_out_dir(args.out)
    check_memory(request, config, launch.world_size, resolve_device(args.device, launch.local_rank),
                 launch.local_world_size, options)


def open_checkpoints(request, layout: dict, rank: int, world: int,
                     also_resumable: tuple[str, ...] = ()) -> StepCheckpoints | None:
    """The request's checkpoint folder, checked on this rank before any collective: a fresh run refuses a
    folder holding a checkpoint, a resumed run one saved by a different request, layout or world size
    (`also_resumable`: request fields a resumed run may change besides the output's)."""
    if request.checkpoint_dir is None:
        return None
    fingerprint = run_fingerprint(asdict(request), layout, RESUMABLE_CHANGES + also_resumable)
    checkpoints = Checkpoints(request.checkpoint_dir, fingerprint, rank, world)
    return StepCheckpoints.open(checkpoints, request.checkpoint_every, request.resume)


def output_stem(request, job: Prepared, size: str) -> str:
    """File name (without extension): the request's name, or model, `size`, layout and seed."""
    model = display_name(request.model)
    return request.name or f"{model}_{size}_{job.workload.name_tag(job.config, job.options)}_seed{request.seed}"


def build_parallel_pipeline(job) -> Any:
    """A prepared image or video job's pipeline on this rank's device, checked by its workload, the workload
    installed, its step cache enabled, its weights sharded where the request asks, batch-invariant where the job
    batches, and checkpointing when the job has checkpoints."""
    request = job.request
    pipe = build_pipeline(request.model, dtype=resolve_dtype(request.dtype), device=rank_device(),
                          allow_pickle=request.allow_pickle, shard_weights=request.shard_weights,
                          offload_layers=request.offload_layers)
    job.workload.parallelize(pipe, job.config, job.options)
    enable_step_cache(pipe, step_cache_config(request, job.options))
    if job.batch_invariant:  # after the workload's own layers, so that it wraps the convs they make
        make_batch_invariant(pipe)
    if job.checkpoints is not None:
        pipe.paragen.enable_checkpoints(job.checkpoints)
    return pipe
