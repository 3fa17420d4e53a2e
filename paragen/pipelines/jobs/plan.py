"""`paragen plan image|video|llm <the job's options> --gpus N [--nodes M] [--device h100]`: every legal layout of
the request on N ranks with its predicted step time (an LLM's: prefill and decode), memory per rank and bytes per
step, fastest first (`paragen.pipelines.cost`); and `--layout auto`, which runs an image or video job in the first
of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from paragen.comms import resolve_device
from paragen.parallel.config import ExchangeConfig, ParallelConfig
from paragen.pipelines import registry
from paragen.pipelines.cost.devices import DEVICES, device_of, profile
from paragen.pipelines.cost.model import Placement
from paragen.pipelines.cost.llm import rank_llm_plans
from paragen.pipelines.cost.plan import rank_plans
from paragen.pipelines.dtypes import resolve_dtype
from paragen.pipelines.jobs import schema
from paragen.pipelines.jobs.common import fit_to_model
from paragen.pipelines.memory_estimate import format_bytes

PLANNED_JOBS = ("image", "video", "llm")
DEVICE_DTYPE = {"cpu": torch.float32}  # what `--dtype auto` gives on a profile's device (its GPUs: bfloat16)


def add_arguments(p: argparse.ArgumentParser, job: str) -> None:
    """The job's own options (its request), and where it would run."""
    importlib.import_module(registry.JOBS[job][0]).add_arguments(p)
    p.add_argument("--gpus", type=int, required=True, help="ranks of the job (GPUs, or CPU processes)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the ranks are spread over, evenly")
    p.add_argument("--device", choices=DEVICES, default="h100", help="the ranks' device (its profile: "
                   "paragen/pipelines/cost/devices.py; cpu: the calibration shipped in cost/profiles/cpu.json)")
    p.add_argument("--profile", type=Path, default=None, help="a device profile calibrated on the machine at hand "
                   "(bench/calibrate_cost.py), instead of --device's")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank (a CPU profile's rates are one "
                   "thread's)")
    p.add_argument("--top", type=int, default=None, help="show only the N fastest layouts")
    p.add_argument("--json", action="store_true", help="as JSON")


def request_of(args: argparse.Namespace, job: str) -> Any:
    """The request a job's options describe, at the model's own size where they give none."""
    module = importlib.import_module(registry.JOBS[job][0])
    return fit_to_model(schema.from_arguments(module.REQUEST, args))


def dtype_of(name: str, device: str) -> torch.dtype:
    """The dtype `--dtype name` means on a profile's `device` (`auto`: float32 on the CPU, bfloat16 on a GPU)."""
    return DEVICE_DTYPE.get(device, torch.bfloat16) if name == "auto" else getattr(torch, name)


def plans_for(args: argparse.Namespace, job: str) -> tuple[list[Any], list[str]]:
    """The ranked plans of `paragen plan`'s arguments (an LLM's prompt: `--context` tokens)."""
    if args.gpus < 1 or args.nodes < 1 or args.gpus % args.nodes:
        raise ValueError(f"--gpus {args.gpus} over --nodes {args.nodes}: the ranks must spread evenly over the nodes")
    device = profile(args.device, args.profile)
    placement = Placement(args.gpus, args.gpus // args.nodes, args.threads)
    if job == "llm":
        return rank_llm_plans(args.model, args.context, args.new_tokens, placement, device,
                              dtype_of(args.dtype, args.device))
    request = request_of(args, job)
    return rank_plans(request, job, placement, device, dtype_of(request.dtype, args.device))


COLUMNS = {  # heading -> (the plan's field, its unit: s or bytes)
    "image": (("step", "step_s", "s"), ("request", "request_s", "s"), ("exposed comm/step", "exposed_comm_s", "s"),
              ("memory/rank", "memory_bytes", "B"), ("bytes/step in node", "bytes_per_step_intra", "B"),
              ("between nodes", "bytes_per_step_inter", "B")),
    "llm": (("prefill", "prefill_s", "s"), ("decode/token", "decode_s_per_token", "s"), ("request", "request_s", "s"),
            ("memory/rank", "memory_bytes", "B"), ("prefill bytes in node", "prefill_bytes_intra", "B"),
            ("between nodes", "prefill_bytes_inter", "B")),
}


def run(args: argparse.Namespace) -> int:
    """Print the ranked plans."""
    plans, refused = plans_for(args, args.plan_job)
    shown = [p.as_dict() for p in (plans[: args.top] if args.top else plans)]
    if args.json:
        print(json.dumps({"plans": shown, "refused": refused}, indent=1))
        return 0
    if not plans:
        print(f"no layout of this request runs on {args.gpus} ranks:\n  " + "\n  ".join(refused))
        return 0
    columns = COLUMNS["llm" if args.plan_job == "llm" else "image"]
    print(f"{'layout':<34}" + "".join(f"{heading:>22}" for heading, _, _ in columns))
    for row in shown:
        cells = [f"{row[key]:.4g} s" if unit == "s" else format_bytes(row[key]) for _, key, unit in columns]
        print(f"{row['layout']:<34}" + "".join(f"{cell:>22}" for cell in cells))
    print(f"first: {' '.join(shown[0]['arguments'])}")
    return 0


def auto_layout(args: argparse.Namespace, job: str, request: Any, launch: Any, options: Any) -> tuple[
        dict[str, int], Any]:
    """`--layout auto`: the degrees and options of the first plan for `request` on the job's ranks and the device
    this rank will compute on (`options`: the job's own, whose mode the plan replaces)."""
    device = resolve_device(args.device, launch.local_rank or 0)
    local_world = launch.local_world_size or launch.world_size
    threads = args.threads or max(1, (os.cpu_count() or 1) // local_world)  # as `launch.process_group.init` sets
    placement = Placement(launch.world_size, local_world, threads if device.type == "cpu" else 1)
    plans, refused = rank_plans(request, job, placement, profile(device_of(device)),
                                resolve_dtype(request.dtype, device))
    if not plans:
        raise ValueError(f"--layout auto: no layout of this request runs on {launch.world_size} ranks: "
                         + "; ".join(refused))
    first = plans[0].layout
    if isinstance(options, ExchangeConfig):
        options = dataclasses.replace(options, mode=first.mode)
    return dict(first.degrees), options


def add_layout_argument(p: argparse.ArgumentParser) -> None:
    """`--layout`: the degrees as given, or the cost model's first plan."""
    p.add_argument("--layout", choices=("given", "auto"), default="given",
                   help="given: the degrees and --mode as given; auto: the first layout `paragen plan` ranks for this "
                        "request on these ranks and this device (the degree options and --mode are then ignored)")


def chosen_layout(args: argparse.Namespace, job: str, class_name: str, request: Any, launch: Any,
                  options: Any) -> tuple[registry.Workload, Any, Any]:
    """(Workload, resolved config, options) of a job: as its options give them, or with `--layout auto` the first
    plan's (every rank computes the same plan from the same request; `agree_prepared` compares their layouts)."""
    given = registry.degrees_of(args, job)
    if getattr(args, "layout", "given") == "auto":
        if getattr(args, "hires", False):
            raise ValueError("--layout auto plans patch, sequence and clip layouts; --hires spreads its windows "
                             "over every rank and takes no other layout")
        degrees, options = auto_layout(args, job, fit_to_model(request), launch, options)
        given = ParallelConfig(**degrees)
    workload = registry.find_for_job(job, class_name, options, args.model)
    return workload, workload.resolve(given, launch.world_size), options
