"""`paragen.init()` and `paragen.shutdown()`: the process group of the job, from any launcher."""
from __future__ import annotations

import gc

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from paragen.comms import is_initialized, is_output_rank, resolve_device, set_operation_timeout
from paragen.comms.device import set_rank_device
from paragen.comms.world import barrier_before_teardown, start_cpu_world
from paragen.launch.env import LaunchInfo, complete_rendezvous, discover
from paragen.log import get_logger, setup_logging

DEFAULT_INIT_TIMEOUT_S = 300.0
DEFAULT_TIMEOUT_S = 120.0


def init(
    *,
    device: str | torch.device = "auto",
    backend: str | None = None,
    init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int | None = None,
    verbose: bool = False,
) -> LaunchInfo:
    """Discover this rank, choose its device, create the process group.

    `device`: `auto` (`cuda:LOCAL_RANK` when CUDA is present, else the CPU), `cuda`, `cuda:N` or `cpu`; read it
    back with `paragen.rank_device()`. The backend is NCCL on CUDA (with a gloo twin of every group for host-side
    metadata) and gloo on CPU. Creation waits up to `init_timeout_s` for every rank; afterwards every collective
    fails after `timeout_s`, so a dead or stuck rank stops the job with an error instead of a hang. On CPU,
    `threads` compute threads per rank (default: the cores divided among the ranks of this host).
    """
    if init_timeout_s <= 0 or timeout_s <= 0:
        raise ValueError("timeouts must be positive")
    info = complete_rendezvous(discover())
    setup_logging(info.rank, info.rank == 0, verbose)
    chosen = resolve_device(device, info.local_rank)  # a bad --device fails here, on every rank, before any rendezvous
    set_rank_device(chosen)
    if is_initialized():
        get_logger().warning("paragen.init(): a process group already exists; using it")
        return info
    backend = backend or ("nccl" if chosen.type == "cuda" else "gloo")
    if chosen.type == "cpu":
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // info.local_world_size))
    timeout = timedelta(seconds=init_timeout_s)
    # NCCL is told its device, so its communicator is made eagerly for that GPU (and groups split from it).
    common = {"timeout": timeout, **({"device_id": chosen} if backend == "nccl" else {})}
    if info.world_size == 1 and info.master_addr is None:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **common)
    elif info.source == "torchrun":
        dist.init_process_group(backend, init_method="env://", **common)
    else:
        dist.init_process_group(backend, init_method=f"tcp://{info.master_addr}:{info.master_port}", rank=info.rank,
                                world_size=info.world_size, **common)
    start_cpu_world()
    set_operation_timeout(timeout_s)
    get_logger().info(
        "process group up: %d rank(s) via %s, backend %s, device %s, %d thread(s) per rank",
        info.world_size, info.source, backend, chosen, torch.get_num_threads(),
    )
    return info


def shutdown() -> None:
    """Destroy the process group if one exists (safe to call twice, and after errors).

    The groups and their pending work are then freed at once, while the interpreter is whole: a parallelised
    pipeline holds its groups in reference cycles (the pipeline and the runtime that intercepts its call), which
    only the cycle collector frees; left to the interpreter's finalisation, a gloo group's worker threads can be
    destroyed unjoined, and the process aborts ("terminate called without an active exception") after a run
    that succeeded."""
    if is_initialized():
        barrier_before_teardown()
        dist.destroy_process_group()
        gc.collect()


__all__ = ["init", "shutdown", "is_output_rank"]
