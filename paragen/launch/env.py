"""Rank discovery for every launcher paragen supports, in one place.

| source (launcher)    | rank / world size                       | local rank / local size                       |
|----------------------|-----------------------------------------|-----------------------------------------------|
| torchrun             | RANK / WORLD_SIZE                       | LOCAL_RANK / LOCAL_WORLD_SIZE                 |
| slurm (an srun step) | SLURM_PROCID / SLURM_STEP_NUM_TASKS [1] | SLURM_LOCALID / SLURM_STEP_TASKS_PER_NODE [2] |
| openmpi (mpirun)     | OMPI_COMM_WORLD_RANK / ..._SIZE         | OMPI_COMM_WORLD_LOCAL_RANK / ..._SIZE         |
| mpich (Hydra, pmi2)  | PMI_RANK / PMI_SIZE                     | MPI_LOCALRANKID / MPI_LOCALNRANKS             |
| pmix (prterun, pmix) | PMIX_RANK / from mpi4py                 | from mpi4py (shared-memory split)             |
| single               | 0 / 1                                   | 0 / 1                                         |

[1] else SLURM_NTASKS (the step's count wins when `srun --preserve-env` keeps the job's).
[2] this node's entry (SLURM_NODEID) of the step layout, e.g. "2(x3),1"; else SLURM_NTASKS_PER_NODE.

Rendezvous: MASTER_ADDR/MASTER_PORT whenever set, under every launcher. Otherwise under srun the
first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST; task 0 runs there under block and cyclic
distributions) and a port derived from SLURM_JOB_ID (below); under MPI launchers
`complete_rendezvous` broadcasts rank 0's address and a free port with mpi4py.

The first source present in this order is chosen. Decisions worth knowing:

- *srun step vs batch script.* sbatch's batch script (and salloc's interactive shell) also carries
  SLURM_PROCID=0 and SLURM_NTASKS=N, but N tasks exist only once `srun` starts them. slurmstepd
  exports SLURM_STEP_ID (and the old name SLURM_STEPID) only for real steps: the batch and
  interactive steps have negative internal ids and get neither. So SLURM counts as a source only
  when SLURM_STEP_ID or SLURM_STEPID is set; `python -m paragen` typed in a batch script runs alone.
- *SLURM port.* Without MASTER_PORT, every task derives the same port from the job:
  `15000 + SLURM_JOB_ID % 10000` (15000-24999, below Linux's ephemeral range, so it does not collide
  with ports the kernel hands out; two jobs sharing a node collide only if their ids match mod 10000).
- *Disagreement.* A lower-priority source that is present and reports the chosen world size must
  report the same rank and local rank, else LaunchError. Exceptions: (1) under a real torchrun agent
  (TORCHELASTIC_RUN_ID set) SLURM is not compared, since `srun torchrun` renumbers ranks by
  rendezvous; (2) PMIx is not compared, its size needs MPI initialised, which a cross-check must not do.
- *mpirun inside a SLURM job.* mpirun/mpiexec start their per-node daemons with srun, so their
  processes inherit that daemon step's variables (one task per node). SLURM step variables are
  therefore set aside when an Open MPI or MPICH source reports a different world size.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Mapping

DEFAULT_MASTER_PORT = 29500
SLURM_PORT_BASE = 15000
MPI_SOURCES = ("openmpi", "mpich", "pmix")


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job, and where the process group meets."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None
    source: str  # "torchrun" | "slurm" | "openmpi" | "mpich" | "pmix" | "single"
    array_task: int = 0  # a SLURM job array's task (0-based), whose share of a request file this job runs
    array_tasks: int = 1  # ... of this many tasks (1: not an array job)


class LaunchError(RuntimeError):
    """The launch environment is malformed, contradictory or incomplete."""


@dataclass(frozen=True)
class _Reading:
    """What one launcher's variables say; sizes are None where that launcher did not say."""

    source: str
    rank: int
    world_size: int | None
    local_rank: int | None
    local_world_size: int | None
    names: tuple[str, str, str, str]  # the variables behind the four values, for messages

    def describe(self) -> str:
        values = (self.rank, self.world_size, self.local_rank, self.local_world_size)
        shown = ", ".join(f"{n}={v}" for n, v in zip(self.names, values) if v is not None)
        return f"{self.source} ({shown})"

    def validated(self) -> _Reading:
        rank_var, size_var, local_rank_var, local_size_var = self.names
        for value, name in ((self.world_size, size_var), (self.local_world_size, local_size_var)):
            if value is not None and value < 1:
                raise LaunchError(f"{self.source}: {name}={value} must be at least 1")
        if self.world_size is not None and self.rank >= self.world_size:
            raise LaunchError(f"{self.source}: {rank_var}={self.rank} must be below "
                              f"{size_var}={self.world_size}")
        if None not in (self.local_rank, self.local_world_size) and self.local_rank >= self.local_world_size:
            raise LaunchError(f"{self.source}: {local_rank_var}={self.local_rank} must be below "
                              f"{local_size_var}={self.local_world_size}")
        if None not in (self.world_size, self.local_world_size) and self.local_world_size > self.world_size:
            raise LaunchError(f"{self.source}: {local_size_var}={self.local_world_size} exceeds "
                              f"{size_var}={self.world_size}")
        return self


def _int(env: Mapping[str, str], name: str, required_by: str | None = None) -> int | None:
    """The variable as a non-negative int; None if absent, unless `required_by` names a source."""
    raw = env.get(name)
    if raw is None:
        if required_by is not None:
            raise LaunchError(f"{required_by}: {name} is not set but its other variables are")
        return None
    if not re.fullmatch(r"[+-]?\d+", raw.strip()):
        raise LaunchError(f"{name}={raw!r} is not an integer")
    value = int(raw)
    if value < 0:
        raise LaunchError(f"{name}={value} must not be negative")
    return value


def _read_named(source: str, env: Mapping[str, str]) -> _Reading | None:
    """Launchers that export all four values under fixed names (torchrun, Open MPI, MPICH)."""
    names = _NAMES[source]
    if names[0] not in env and names[1] not in env:
        return None
    rank, size = (_int(env, name, source) for name in names[:2])
    return _Reading(source, rank, size, _int(env, names[2]), _int(env, names[3]), names).validated()


_NAMES = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}


def _read_slurm(env: Mapping[str, str]) -> _Reading | None:
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return None  # a batch script or salloc shell, not an srun step: see the module docstring
    size_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    local_size_var, local_size = _slurm_local_size(env)
    return _Reading("slurm", _int(env, "SLURM_PROCID", "slurm"), _int(env, size_var, "slurm"),
                    _int(env, "SLURM_LOCALID"), local_size,
                    ("SLURM_PROCID", size_var, "SLURM_LOCALID", local_size_var)).validated()


def _slurm_local_size(env: Mapping[str, str]) -> tuple[str, int | None]:
    """Tasks on this node: the step's layout ("2(x3),1", one entry per node) at SLURM_NODEID."""
    name = "SLURM_STEP_TASKS_PER_NODE"
    spec = env.get(name)
    if spec is None:
        return "SLURM_NTASKS_PER_NODE", _int(env, "SLURM_NTASKS_PER_NODE")
    counts: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            raise LaunchError(f"{name}={spec!r} is malformed (expected e.g. '2(x3),1')")
        counts += [int(match[1])] * int(match[2] or 1)
    node = _int(env, "SLURM_NODEID")
    if node is None:
        if len(set(counts)) > 1:
            raise LaunchError(f"{name}={spec!r} differs between nodes but SLURM_NODEID is not set")
        return name, counts[0]
    if node >= len(counts):
        raise LaunchError(f"SLURM_NODEID={node} is outside {name}={spec!r} ({len(counts)} nodes)")
    return name, counts[node]


def _read_pmix(env: Mapping[str, str]) -> _Reading | None:
    rank = _int(env, "PMIX_RANK")
    if rank is None:
        return None
    return _Reading("pmix", rank, None, None, None,
                    ("PMIX_RANK", "MPI.COMM_WORLD size", "node-local rank", "node-local size"))


_READERS = (partial(_read_named, "torchrun"), _read_slurm, partial(_read_named, "openmpi"),
            partial(_read_named, "mpich"), _read_pmix)


def _mpi(needed_for: str) -> Any:
    """mpi4py's MPI module (importing it initialises MPI), or a LaunchError saying how to get it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise LaunchError(f"{needed_for} needs mpi4py, which cannot be imported ({exc}); "
                          "install it with `pip install paragen[mpi]`") from exc
    return MPI


def finalize_mpi() -> None:
    """Finalise MPI if rank discovery initialised it (mpi4py imported): a process about to leave with `os._exit`
    skips mpi4py's own finalisation at exit, and mpirun reports a rank that never finalised as an abnormal end."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


def _complete_pmix(reading: _Reading) -> _Reading:
    """PMIx exports only the rank; the sizes come from MPI itself."""
    mpi = _mpi("PMIx exports no world size; reading it from MPI")
    world = mpi.COMM_WORLD
    if world.Get_rank() != reading.rank:
        raise LaunchError(f"PMIX_RANK={reading.rank} but MPI.COMM_WORLD rank is {world.Get_rank()}")
    node = world.Split_type(mpi.COMM_TYPE_SHARED)
    try:
        local_rank, local_size = node.Get_rank(), node.Get_size()
    finally:
        node.Free()
    return replace(reading, world_size=world.Get_size(), local_rank=local_rank,
                   local_world_size=local_size).validated()


def _compare(chosen: _Reading, other: _Reading, env: Mapping[str, str]) -> None:
    if other.world_size is None or other.world_size != chosen.world_size:
        return
    if chosen.source == "torchrun" and other.source == "slurm" and "TORCHELASTIC_RUN_ID" in env:
        return  # `srun torchrun` renumbers ranks by rendezvous
    both_local = None not in (chosen.local_rank, other.local_rank)
    local_differs = both_local and chosen.local_rank != other.local_rank
    if other.rank != chosen.rank or local_differs:
        raise LaunchError(f"launchers disagree: {chosen.describe()} but {other.describe()}")


def _master_port(env: Mapping[str, str]) -> int | None:
    port = _int(env, "MASTER_PORT")
    if port is not None and not 1 <= port <= 65535:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return port


def _rendezvous(env: Mapping[str, str], source: str) -> tuple[str | None, int | None]:
    addr, port = env.get("MASTER_ADDR") or None, _master_port(env)
    if source != "slurm":
        return addr, port
    if addr is None:
        name = "SLURM_STEP_NODELIST" if "SLURM_STEP_NODELIST" in env else "SLURM_JOB_NODELIST"
        if name not in env:
            raise LaunchError("slurm: neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set, "
                              "so the head node is unknown; set MASTER_ADDR")
        addr = parse_slurm_nodelist(env[name])[0]
    job_id = _int(env, "SLURM_JOB_ID")
    if port is None and job_id is not None:
        port = SLURM_PORT_BASE + job_id % 10000
    return addr, port


def discover(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read rank and layout from the launcher's variables (`os.environ` by default).

    Sources are tried in the order of the module docstring's table; contradictory or malformed
    variables raise LaunchError instead of being guessed around.
    """
    env = os.environ if environ is None else environ
    return replace(_discover_ranks(env), **_array_share(env))


def _array_share(env: Mapping[str, str]) -> dict[str, int]:
    """This job's place in a SLURM job array (`sbatch --array`): task index from 0, and the number of tasks."""
    task, count = _int(env, "SLURM_ARRAY_TASK_ID"), _int(env, "SLURM_ARRAY_TASK_COUNT")
    if task is None:
        return {}
    first = _int(env, "SLURM_ARRAY_TASK_MIN") or 0
    if count is None or not 0 <= task - first < count:
        raise LaunchError(f"SLURM_ARRAY_TASK_ID={task} is not one of SLURM_ARRAY_TASK_COUNT={count} tasks "
                          f"from SLURM_ARRAY_TASK_MIN={first}")
    return {"array_task": task - first, "array_tasks": count}


def _discover_ranks(env: Mapping[str, str]) -> LaunchInfo:
    readings = [r for r in (read(env) for read in _READERS) if r is not None]
    slurm_sizes = [r.world_size for r in readings if r.source == "slurm"]
    mpi_sizes = [r.world_size for r in readings if r.source in ("openmpi", "mpich")]
    if slurm_sizes and any(size != slurm_sizes[0] for size in mpi_sizes):
        readings = [r for r in readings if r.source != "slurm"]  # mpirun's daemon step, not ours
    if not readings:
        addr, port = _rendezvous(env, "single")
        return LaunchInfo(0, 1, 0, 1, addr, port, "single")
    chosen = _complete_pmix(readings[0]) if readings[0].source == "pmix" else readings[0]
    for other in readings[1:]:
        _compare(chosen, other, env)
    local_rank, local_size = chosen.local_rank, chosen.local_world_size
    if chosen.world_size == 1:
        local_rank, local_size = 0, 1
    elif local_rank is None or local_size is None:
        raise LaunchError(f"{chosen.describe()}: {chosen.names[2]} and {chosen.names[3]} must both be set")
    addr, port = _rendezvous(env, chosen.source)
    return LaunchInfo(chosen.rank, chosen.world_size, local_rank, local_size, addr, port, chosen.source)


_HOST = r"(?:[^\[\],\s]|\[[^\[\]]+\])+"  # one name: literal runs and bracket groups


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: "node[01-03,07],gpu-a[1-2]" -> node01 node02 node03 node07 gpu-a1 gpu-a2.

    Zero padding follows the range's first number; several bracket groups in one name expand as a
    product ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2). Raises LaunchError on malformed input.
    """
    text = nodelist.strip()
    if not re.fullmatch(rf"{_HOST}(?:,{_HOST})*", text):
        raise LaunchError(f"malformed SLURM node list {nodelist!r}")
    hosts: list[str] = []
    for name in re.findall(_HOST, text):
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", name):
            choices = _expand_ranges(ranges, nodelist) if ranges else [""]
            expanded = [prefix + literal + choice for prefix in expanded for choice in choices]
        hosts += expanded
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    values: list[str] = []
    for part in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise LaunchError(f"malformed SLURM node list {nodelist!r}: bad range {part!r}")
        lo, hi = match[1], match[2] or match[1]
        values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return values


def complete_rendezvous(info: LaunchInfo) -> LaunchInfo:
    """Fill in master_addr/master_port where the launcher did not say them.

    World size 1 without an address is left alone (an in-memory store serves it). An address
    without a port gets 29500. Under MPI launchers rank 0 picks its address and a free port and
    broadcasts both with mpi4py, so every rank must call this.
    """
    if info.master_addr is not None:
        return info if info.master_port is not None else replace(info, master_port=DEFAULT_MASTER_PORT)
    if info.world_size == 1:
        return info
    if info.source not in MPI_SOURCES:
        raise LaunchError(f"{info.source} launch of {info.world_size} ranks has no MASTER_ADDR; "
                          "export MASTER_ADDR and MASTER_PORT")
    world = _mpi(f"{info.source} launch without MASTER_ADDR: sharing rank 0's address").COMM_WORLD
    if world.Get_size() != info.world_size:
        raise LaunchError(f"{info.source} reports world size {info.world_size} but MPI.COMM_WORLD "
                          f"has {world.Get_size()}")
    endpoint = _rank0_endpoint(info) if world.Get_rank() == 0 else None
    endpoint = world.bcast(endpoint, root=0)
    if world.Get_rank() != info.rank:
        raise LaunchError(f"{info.source} reports rank {info.rank} but MPI.COMM_WORLD rank is "
                          f"{world.Get_rank()}")
    if isinstance(endpoint, str):  # rank 0 failed; every rank raises the same error
        raise LaunchError(endpoint)
    addr, port = endpoint
    return replace(info, master_addr=addr, master_port=port)


def _rank0_endpoint(info: LaunchInfo) -> tuple[str, int] | str:
    """Rank 0's reachable address and a free port, or an error message to broadcast."""
    addr = _host_address()
    if addr is None:
        if info.local_world_size != info.world_size:
            return (f"rank 0's hostname {socket.gethostname()!r} resolves to no non-loopback IPv4 "
                    "address that other nodes could reach; set MASTER_ADDR")
        addr = "127.0.0.1"  # every rank is on this host
    if info.master_port is not None:
        return addr, info.master_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))  # the kernel picks a free port; it may be taken again before use (rare)
        return addr, sock.getsockname()[1]


def _host_address() -> str | None:
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return None
    for *_, sockaddr in infos:
        if not ipaddress.ip_address(sockaddr[0]).is_loopback:
            return sockaddr[0]
    return None
