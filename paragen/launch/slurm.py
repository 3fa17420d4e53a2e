"""A ready-to-submit sbatch script for a multi-node paragen run.

One SLURM task per node runs a torchrun agent; the agents meet at the head node through torchrun's
c10d rendezvous and start one worker per GPU. Rank discovery inside the workers then reads
torchrun's variables (see `paragen.launch.env`).
"""
from __future__ import annotations

import re
import shlex

from paragen.launch.env import SLURM_PORT_BASE

CPUS_PER_GPU = 8  # default cores per GPU: the node's task (one torchrun agent) gets CPUS_PER_GPU * gpus_per_node
CPU_JOB_CPUS = 16  # default cores of a CPU job's one worker per node


def _names_requests(command: list[str]) -> bool:
    """Whether `command` passes a request file, as `--requests FILE` or `--requests=FILE`."""
    return any(arg == "--requests" or arg.startswith("--requests=") for arg in command)


def sbatch_script(
    *,
    nodes: int,
    gpus_per_node: int,
    command: list[str],
    job_name: str = "paragen",
    time: str = "01:00:00",
    partition: str | None = None,
    port: int | None = None,
    cpus_per_task: int | None = None,
    requeue: bool = False,
    array: int | None = None,
) -> str:
    """The text of an sbatch script running `python -m paragen <command...>` on `nodes` nodes.

    `gpus_per_node=0` asks for a CPU run: one worker per node instead of one per GPU.
    `cpus_per_task`: cores of the node's one task, which runs the torchrun agent and all its workers
    (None: `CPUS_PER_GPU * gpus_per_node` for GPU jobs, `CPU_JOB_CPUS` for CPU jobs); sbatch and srun
    both get it. `port` is the rendezvous port on the head node; None derives it in the script from the
    job id, `SLURM_PORT_BASE + SLURM_JOB_ID % 10000` as `paragen.launch.env` does, so two jobs sharing
    a head node do not collide (every array task has its own job id). An explicit port with `array`:
    task k uses `port + k`. `requeue`: SLURM may requeue the job after a preemption or a node failure;
    a request file's manifest makes the rerun skip what is done. `array`: that many array tasks, each
    taking its share of the command's `--requests` file (`--requests FILE` or `--requests=FILE`).
    Submit with `sbatch <file>`.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be at least 1, got {nodes}")
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node must be 0 (CPU) or more, got {gpus_per_node}")
    if cpus_per_task is None:
        cpus_per_task = CPUS_PER_GPU * gpus_per_node if gpus_per_node else CPU_JOB_CPUS
    if cpus_per_task < 1:
        raise ValueError(f"cpus_per_task must be at least 1, got {cpus_per_task}")
    if not command:
        raise ValueError("command must name a paragen workload and its arguments, got an empty list")
    if array is not None and (array < 1 or not _names_requests(command)):
        raise ValueError("--array N (N >= 1) splits a request file over N array tasks: "
                         "the command needs --requests FILE (or --requests=FILE)")
    if port is not None:
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be a TCP port (1-65535), got {port}")
        if array is not None and port + array - 1 > 65535:
            raise ValueError(f"port {port} + array task {array - 1} is past 65535: pick a lower --port")
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
    directives.append(f"--cpus-per-task={cpus_per_task}")
    nproc = gpus_per_node or 1

    if port is None:  # every array task has its own SLURM_JOB_ID
        endpoint_port = f"$(({SLURM_PORT_BASE} + SLURM_JOB_ID % 10000))"
    else:
        endpoint_port = str(port) if array is None else f"$(({port} + SLURM_ARRAY_TASK_ID))"
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "", "set -eu", "",
             "# The first host of the allocation serves the c10d rendezvous.",
             'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             ': "${head_node:?scontrol found no host in SLURM_JOB_NODELIST}"', "",
             "# srun does not inherit --cpus-per-task from sbatch on every SLURM version: say it again.",
             f"srun --cpus-per-task={cpus_per_task} torchrun \\",
             f"    --nnodes {nodes} \\",
             f"    --nproc-per-node {nproc} \\",
             "    --rdzv-backend c10d \\",
             f'    --rdzv-endpoint "$head_node:{endpoint_port}" \\',
             '    --rdzv-id "$SLURM_JOB_ID" \\',
             f"    -m paragen {shlex.join(command)}"]
    return "\n".join(lines) + "\n"
