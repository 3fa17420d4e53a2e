"""What every job shares: the prepared job, output and checkpoint options, the pre-init room check, checkpoints."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from paragen.comms import rank_device, resolve_device
from paragen.parallel.config import ParallelConfig
from paragen.pipelines.checkpoint import RESUMABLE_CHANGES, Checkpoints, StepCheckpoints, run_fingerprint
from paragen.pipelines.dtypes import DTYPE_HELP, DTYPES, resolve_dtype
from paragen.pipelines.loading import build_pipeline
from paragen.pipelines.registry import Workload


@dataclass(frozen=True)
class Prepared:
    """A job's checked request(s), ready to run once the process group exists."""

    request: Any  # the command line's request
    workload: Workload
    config: ParallelConfig  # resolved
    options: Any  # the workload's options
    check: Callable[[Any], Any]  # one request's pre-init checks; returns it as the job's `generate` takes it
    item: Any = None  # the single request, checked (None with a request file)
    batch: Any = None  # --requests: the file's requests (a `jobs.batch.Batch`)
    checkpoints: StepCheckpoints | None = None


def add_output_arguments(p: argparse.ArgumentParser, out_dir: str, what: str) -> None:
    """--dtype, --allow-pickle, --out (the folder for `what`) and --name."""
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help=DTYPE_HELP)
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle (.bin/.ckpt) weights, which can run arbitrary code")
    p.add_argument("--out", default=out_dir, help=f"folder for {what}")
    p.add_argument("--name", default=None, help="output file name without extension (default: encodes the layout)")
    p.add_argument("--requests", default=None, metavar="FILE.jsonl",
                   help="many requests, one JSON object per line (its fields override the command line's; its 'id' "
                        "names its outputs); the model is loaded once; a rerun skips what manifest.json records as done")
    p.add_argument("--strict", action="store_true", help="with --requests: stop at the first refused line")


def add_checkpoint_arguments(p, every: int) -> None:
    """--checkpoint, --checkpoint-every, --resume."""
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="save every rank's state in DIR every --checkpoint-every steps (must not hold a checkpoint)")
    p.add_argument("--checkpoint-every", type=int, default=every, help="steps between checkpoints")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run checkpointed in DIR (same request, layout and number of ranks)")


def checkpoint_folder(args: argparse.Namespace) -> str | None:
    """The folder of --checkpoint / --resume (a resumed run keeps checkpointing where it was)."""
    if args.resume and args.checkpoint and args.resume != args.checkpoint:
        raise ValueError("--resume continues the run in its folder and keeps checkpointing there; drop --checkpoint")
    return args.resume or args.checkpoint


def int_list(text: str, flag: str) -> list[int]:
    """Comma-separated whole numbers of option `flag`."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None


def check_room(args: argparse.Namespace, request, config: ParallelConfig, launch, options: Any) -> None:
    """An image or video request's output folder and its memory per rank (resolved `config`, workload `options`)."""
    from paragen.pipelines.memory_estimate import check_memory
    from paragen.pipelines.outputs import check_out_dir

    check_out_dir(args.out)
    check_memory(request, config, launch.world_size, resolve_device(args.device, launch.local_rank),
                 launch.local_world_size, options)


def open_checkpoints(request, config: ParallelConfig, workload: Workload, options: Any, rank: int, world: int,
                     also_resumable: tuple[str, ...] = ()) -> StepCheckpoints | None:
    """The request's checkpoint folder, checked on this rank before any collective: a fresh run refuses a
    folder holding a checkpoint, a resumed run one saved by a different request, layout or world size
    (`also_resumable`: request fields a resumed run may change besides the output's)."""
    if request.checkpoint_dir is None:
        return None
    layout = {**asdict(config), workload.options_name: asdict(options)}
    fingerprint = run_fingerprint(asdict(request), layout, RESUMABLE_CHANGES + also_resumable)
    checkpoints = Checkpoints(request.checkpoint_dir, fingerprint, rank, world)
    return StepCheckpoints.open(checkpoints, request.checkpoint_every, request.resume)


def output_stem(request, config: ParallelConfig, options: Any, size: str) -> str:
    """File name (without extension): the request's name, or model, `size`, layout and seed."""
    model = Path(request.model).name if Path(request.model).exists() else request.model
    return request.name or f"{model}_{size}_{options.layout_tag(config)}_seed{request.seed}"


def build_parallel_pipeline(job) -> Any:
    """A prepared image or video job's pipeline on this rank's device, checked by its workload, the workload
    installed, and checkpointing when the job has checkpoints."""
    request = job.request
    pipe = build_pipeline(request.model, dtype=resolve_dtype(request.dtype), device=rank_device(),
                          allow_pickle=request.allow_pickle)
    job.workload.check(pipe, job.config, job.options)
    job.workload.install(pipe, job.config, job.options)
    if job.checkpoints is not None:
        pipe.paragen.enable_checkpoints(job.checkpoints)
    return pipe
