"""A ready-to-submit sbatch script for a multi-node paragen run.

One SLURM task per node runs a torchrun agent; the agents meet at the head node through torchrun's
c10d rendezvous and start one worker per GPU. Rank discovery inside the workers then reads
torchrun's variables (see `paragen.launch.env`).
"""
from __future__ import annotations

import re
import shlex


def sbatch_script(
    *,
    nodes: int,
    gpus_per_node: int,
    command: list[str],
    job_name: str = "paragen",
    time: str = "01:00:00",
    partition: str | None = None,
    port: int = 29500,
    cpus_per_task: int = 16,
    requeue: bool = False,
    array: int | None = None,
) -> str:
    """The text of an sbatch script running `python -m paragen <command...>` on `nodes` nodes.

    `gpus_per_node=0` asks for a CPU run: one worker per node with `cpus_per_task` cores instead of
    GPUs. `port` is the rendezvous port on the head node (task k of an array uses `port + k`).
    `requeue`: SLURM may requeue the job after a preemption or a node failure; a request file's manifest
    makes the rerun skip what is done. `array`: that many array tasks, each taking its share of the
    command's `--requests` file. Submit with `sbatch <file>`.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be at least 1, got {nodes}")
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node must be 0 (CPU) or more, got {gpus_per_node}")
    if cpus_per_task < 1:
        raise ValueError(f"cpus_per_task must be at least 1, got {cpus_per_task}")
    if not command:
        raise ValueError("command must name a paragen workload and its arguments, got an empty list")
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be a TCP port (1-65535), got {port}")
    if array is not None and (array < 1 or "--requests" not in command):
        raise ValueError("--array N (N >= 1) splits a request file over N array tasks: the command needs --requests")
    for name, value in (("job_name", job_name), ("time", time), ("partition", partition)):
        if value is not None and not re.fullmatch(r"[^\s#]+", value):
            raise ValueError(f"{name} must be one word without spaces or '#', got {value!r}")

    directives = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1", f"--time={time}"]
    if partition is not None:
        directives.append(f"--partition={partition}")
    if requeue:
        directives += ["--requeue", "--open-mode=append"]
    if array is not None:
        directives.append(f"--array=0-{array - 1}")
    if gpus_per_node:
        directives.append(f"--gpus-per-node={gpus_per_node}")
        srun, nproc = "srun", gpus_per_node
    else:
        directives.append(f"--cpus-per-task={cpus_per_task}")
        # srun does not inherit --cpus-per-task from sbatch on every SLURM version: say it again
        srun, nproc = f"srun --cpus-per-task={cpus_per_task}", 1

    endpoint_port = str(port) if array is None else f"$(({port} + SLURM_ARRAY_TASK_ID))"
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "", "set -eu", "",
             "# The first host of the allocation serves the c10d rendezvous.",
             'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             ': "${head_node:?scontrol found no host in SLURM_JOB_NODELIST}"', "",
             f"{srun} torchrun \\",
             f"    --nnodes {nodes} \\",
             f"    --nproc-per-node {nproc} \\",
             "    --rdzv-backend c10d \\",
             f'    --rdzv-endpoint "$head_node:{endpoint_port}" \\',
             '    --rdzv-id "$SLURM_JOB_ID" \\',
             f"    -m paragen {shlex.join(command)}"]
    return "\n".join(lines) + "\n"
