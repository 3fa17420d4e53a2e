"""Facts about the default (world) process group that layers above may ask for."""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d

OUTPUT_RANK = 0


def is_initialized() -> bool:
    """True once `paragen.init()` (or the user) created the default process group."""
    return dist.is_available() and dist.is_initialized()


def world_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def backend_name() -> str:
    """The default process group's backend (`gloo`, `nccl`, …)."""
    return str(dist.get_backend())


_cpu_world: dist.ProcessGroup | None = None


def needs_cpu_twins() -> bool:
    """Whether groups need a gloo twin for host-side metadata: the backend cannot take CPU tensors (NCCL)."""
    return is_initialized() and backend_name() != "gloo"


def new_group(ranks: list[int]) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """A group over `ranks` and its host-side twin (a gloo group over the same ranks when the backend is NCCL;
    the group itself under gloo). Every rank must call this for every group, in the same order."""
    group = dist.new_group(ranks)
    return group, dist.new_group(ranks, backend="gloo") if needs_cpu_twins() else group


def start_cpu_world() -> None:
    """Make the world group's host-side twin (after `init_process_group`; every rank calls it)."""
    global _cpu_world
    _cpu_world = dist.new_group(backend="gloo") if needs_cpu_twins() and dist.get_world_size() > 1 else None


def world_groups() -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """The world group and its host-side twin."""
    return dist.group.WORLD, _cpu_world or dist.group.WORLD


def world_size() -> int:
    """Number of processes in the job (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_output_rank() -> bool:
    """True on the one rank that writes outputs and shows progress."""
    return world_rank() == OUTPUT_RANK


_operation_timeout: timedelta | None = None


def set_operation_timeout(seconds: float) -> None:
    """Steady-state timeout of every collective: on the world group now, on each group wrapped later.

    Process-group creation uses a longer timeout (ranks start at different times); once running, a
    rank that died or hangs should stop the others within this many seconds, not the backend's default.
    """
    global _operation_timeout
    _operation_timeout = timedelta(seconds=seconds)
    apply_operation_timeout(None)


def apply_operation_timeout(group: dist.ProcessGroup | None) -> None:
    """Give `group` (None: the world group) the configured steady-state timeout, if one is set."""
    if _operation_timeout is not None and is_initialized():
        distributed_c10d._set_pg_timeout(_operation_timeout, group)


def barrier_before_teardown() -> None:
    """Wait until every rank is done communicating, so no rank closes connections a peer still reads.

    (With gloo, a peer's background thread that loses its connection mid-read terminates the process.)
    A failure here is ignored: teardown goes on regardless.
    """
    global _cpu_world
    if is_initialized() and dist.get_world_size() > 1:
        try:
            dist.barrier(group=world_groups()[1])
        except RuntimeError:
            pass
    _cpu_world = None
