"""The JSON run report of a job: request, layout, machine, timings and every rank's traffic."""
from __future__ import annotations

import statistics
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from paragen.comms import all_gather_objects, is_output_rank, world_size


def git_revision() -> str:
    """The source revision the run came from ('unknown' outside a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def job_report(job: str, request: dict[str, Any], pipe, workload, options: Any, *, load_s: float,
               generate_s: float) -> dict | None:
    """The report of a finished request of `job` on the output rank (None on the others): the request, the
    resolved degrees (`config`), the `workload` and its options, timings and traffic. Every rank must call it:
    it gathers each rank's communication statistics."""
    runtime = pipe.paragen
    per_rank = all_gather_objects(runtime.mesh.group("world"), runtime.stats.snapshot())
    if not is_output_rank():
        return None
    steps = runtime.step_seconds
    return {
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
        "comm_per_rank": {str(rank): stats for rank, stats in enumerate(per_rank)},
    }
