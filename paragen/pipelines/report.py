"""The JSON run report of a job: request, layout, machine, timings, and every rank's traffic, memory and load time."""
from __future__ import annotations

import resource
import statistics
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from paragen.comms import all_gather_objects, is_output_rank, world_size
from paragen.comms.weight_shards import resident_bytes
from paragen.pipelines.loading import LOADED


def git_revision() -> str:
    """The source revision the run came from ('unknown' outside a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def peak_memory(device: torch.device) -> dict[str, Any]:
    """This process's peak memory so far: the CUDA allocator's peak on a GPU, the process's peak resident set on the
    CPU (which also counts the interpreter and the libraries)."""
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "of": "CUDA allocator (max_memory_allocated)"}
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "of": "process peak RSS"}


def rank_memory(model: Any, load_s: float) -> dict[str, Any]:
    """What one rank holds and took: its parameter bytes per component (its shards where weights are sharded), how
    it got each component's weights (read whole, its rows read, read and sent, received), its peak memory, and how
    long its model took to load."""
    parts = {"model": model} if isinstance(model, torch.nn.Module) else {
        name: part for name, part in model.components.items() if isinstance(part, torch.nn.Module)}
    resident = {name: resident_bytes(part) for name, part in parts.items()}
    return {"load_s": load_s, "resident_param_bytes": sum(resident.values()), "resident_param_bytes_by_component":
            resident, "loaded": {name: getattr(part, LOADED, "read whole") for name, part in parts.items()},
            **peak_memory(model.device)}


def job_report(job: str, request: dict[str, Any], pipe, workload, options: Any, *, load_s: float,
               generate_s: float) -> dict | None:
    """The report of a finished request of `job` on the output rank (None on the others): the request, the
    resolved degrees (`config`), the `workload` and its options, timings, and each rank's traffic, memory and load
    time. Every rank must call it:
    it gathers each rank's communication statistics."""
    runtime = pipe.paragen
    step_cache = getattr(runtime, "step_cache", None)
    cache = None if step_cache is None else step_cache.last
    per_rank = all_gather_objects(runtime.mesh.group("world"),
                                  (runtime.stats.snapshot(), rank_memory(pipe, load_s), cache))
    if not is_output_rank():
        return None
    steps = runtime.step_seconds
    return {**({} if cache is None else {"step_cache": cache_report([record for _, _, record in per_rank])}),
        "job": job,
        "workload": workload.name,
        "request": request,
        "config": asdict(runtime.config),
        workload.options_name: asdict(options),
        "world_size": world_size(),
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "threads_per_rank": torch.get_num_threads(),
        "git_revision": git_revision(),
        "timings": {
            "load_s": load_s,
            "generate_s": generate_s,
            "step_s": steps,
            "step_median_s": statistics.median(steps) if steps else None,
        },
        "comm_per_rank": {str(rank): stats for rank, (stats, _, _) in enumerate(per_rank)},
        "memory_per_rank": {str(rank): memory for rank, (_, memory, _) in enumerate(per_rank)},
    }


def cache_report(records: list[dict]) -> dict:
    """The step cache's part of a report: the output rank's record, every rank's computed and served steps, and
    whether they all match (they must: the ranks decide together)."""
    agree = all(r["computed_steps"] == records[0]["computed_steps"] for r in records)
    return {**records[0], "ranks_agree": agree, "per_rank": {str(rank): {"computed_steps": r["computed_steps"],
                                                                         "cached_steps": r["cached_steps"]}
                                                             for rank, r in enumerate(records)}}
