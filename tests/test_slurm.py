"""The sbatch script: right numbers, a quoted command that survives the shell, valid bash."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from paragen.launch.env import SLURM_PORT_BASE, discover
from paragen.launch.slurm import sbatch_script

COMMAND = ["image", "--prompt", "a cat's hat; rm -rf /", "--steps", "$HOME"]


def _run_with_fake_slurm(script: str, tmp_path: Path, **env_extra: str) -> tuple[list[str], list[str]]:
    """Run the script with stub scontrol/srun/torchrun on PATH; return srun's options and the argv torchrun got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": '[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"',
        # one task here (a real srun starts one per node); its options go to SRUN_FILE
        "srun": 'while [ "${1#-}" != "$1" ]; do printf "%s\\0" "$1"; shift; done > "$SRUN_FILE"; exec "$@"',
        "torchrun": 'for a in "$@"; do printf "%s\\0" "$a"; done > "$ARGV_FILE"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    argv_file, srun_file = tmp_path / "argv", tmp_path / "srun"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "4242", "ARGV_FILE": str(argv_file), "SRUN_FILE": str(srun_file),
           "HOME": "/nonexistent", **env_extra}
    subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, check=True, timeout=30)
    return srun_file.read_text().split("\0")[:-1], argv_file.read_text().split("\0")[:-1]


def _endpoint(argv: list[str]) -> str:
    return argv[argv.index("--rdzv-endpoint") + 1]


def test_gpu_script_has_the_right_directives_and_launch() -> None:
    script = sbatch_script(nodes=4, gpus_per_node=8, command=COMMAND, job_name="sdxl",
                           time="02:30:00", partition="h100", port=29600)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--job-name=sdxl", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                      "--time=02:30:00", "--partition=h100", "--cpus-per-task=64"):  # 8 cores per GPU by default
        assert f"#SBATCH {directive}" in lines
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert "srun --cpus-per-task=64 torchrun" in script
    for fragment in ("--nnodes 4", "--nproc-per-node 8", "--rdzv-backend c10d",
                     '--rdzv-endpoint "$head_node:29600"', '--rdzv-id "$SLURM_JOB_ID"'):
        assert fragment in script


def test_gpu_script_takes_cpus_per_task() -> None:
    script = sbatch_script(nodes=2, gpus_per_node=4, command=["image"], cpus_per_task=12)
    assert "#SBATCH --cpus-per-task=12" in script.splitlines()
    assert "srun --cpus-per-task=12 torchrun" in script
    assert "#SBATCH --gpus-per-node=4" in script.splitlines()


def test_cpu_script_asks_for_cores_not_gpus() -> None:
    script = sbatch_script(nodes=2, gpus_per_node=0, command=["llm"], cpus_per_task=32)
    assert "gpus" not in script
    assert "#SBATCH --cpus-per-task=32" in script.splitlines()
    assert "srun --cpus-per-task=32 torchrun" in script
    assert "--nproc-per-node 1" in script
    assert "--partition" not in script
    default = sbatch_script(nodes=2, gpus_per_node=0, command=["llm"])
    assert "#SBATCH --cpus-per-task=16" in default.splitlines()
    assert "srun --cpus-per-task=16 torchrun" in default


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gpus_per_node": 0},
        {"gpus_per_node": 8},
        {"gpus_per_node": 8, "cpus_per_task": 12, "port": 29600},
        {"gpus_per_node": 2, "array": 3, "command": ["image", "--requests=r.jsonl"]},
        {"gpus_per_node": 2, "array": 3, "port": 29600, "command": ["image", "--requests", "r.jsonl"]},
    ],
)
def test_script_is_valid_bash(kwargs: dict, tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(sbatch_script(**{"nodes": 2, "command": COMMAND, **kwargs}))
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_command_reaches_torchrun_verbatim(tmp_path: Path) -> None:
    srun, argv = _run_with_fake_slurm(sbatch_script(nodes=2, gpus_per_node=4, command=COMMAND), tmp_path)
    assert srun == ["--cpus-per-task=32"]
    assert argv == ["--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "gpu07:19242", "--rdzv-id", "4242", "-m", "paragen", *COMMAND]


def test_default_port_comes_from_the_job_id_like_rank_discovery(tmp_path: Path) -> None:
    script = sbatch_script(nodes=2, gpus_per_node=4, command=COMMAND)
    assert f'--rdzv-endpoint "$head_node:$(({SLURM_PORT_BASE} + SLURM_JOB_ID % 10000))"' in script
    ports = []
    for job_id in ("4242", "1234567"):  # two jobs sharing a head node: two ports
        run_dir = tmp_path / job_id
        run_dir.mkdir()
        _, argv = _run_with_fake_slurm(script, run_dir, SLURM_JOB_ID=job_id)
        srun_env = {"SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
                    "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
        assert _endpoint(argv) == f"gpu07:{discover(srun_env).master_port}"  # the rule of paragen.launch.env
        ports.append(_endpoint(argv))
    assert ports == ["gpu07:19242", "gpu07:19567"]


def test_array_tasks_get_their_own_ports(tmp_path: Path) -> None:
    command = ["image", "--requests", "r.jsonl"]
    derived = sbatch_script(nodes=1, gpus_per_node=2, command=command, array=3)
    (tmp_path / "derived").mkdir()
    _, argv = _run_with_fake_slurm(derived, tmp_path / "derived", SLURM_JOB_ID="4243", SLURM_ARRAY_TASK_ID="1")
    assert _endpoint(argv) == "gpu07:19243"  # each array task has its own SLURM_JOB_ID
    explicit = sbatch_script(nodes=1, gpus_per_node=2, command=command, array=3, port=29600)
    (tmp_path / "explicit").mkdir()
    _, argv = _run_with_fake_slurm(explicit, tmp_path / "explicit", SLURM_ARRAY_TASK_ID="2")
    assert _endpoint(argv) == "gpu07:29602"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "nodes must be at least 1"),
        ({"gpus_per_node": -1}, "gpus_per_node must be 0"),
        ({"command": []}, "command must name"),
        ({"port": 0}, "port must be a TCP port"),
        ({"port": 65536}, "port must be a TCP port"),
        ({"port": 65535, "array": 2, "command": ["image", "--requests", "r.jsonl"]}, "past 65535"),
        ({"cpus_per_task": 0}, "cpus_per_task must be at least 1"),
        ({"cpus_per_task": -4, "gpus_per_node": 0}, "cpus_per_task must be at least 1"),
        ({"job_name": "two words"}, "job_name must be one word"),
        ({"partition": "gpu\n#SBATCH --x"}, "partition must be one word"),
        ({"array": 0, "command": ["image", "--requests", "r.jsonl"]}, "needs --requests"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, message: str) -> None:
    arguments = {"nodes": 1, "gpus_per_node": 1, "command": ["image"], **kwargs}
    with pytest.raises(ValueError, match=message):
        sbatch_script(**arguments)


def test_requeue_and_array_split_a_request_file():
    script = sbatch_script(nodes=1, gpus_per_node=2, command=["image", "--requests", "r.jsonl"], requeue=True, array=3,
                           port=29500)
    lines = script.splitlines()
    for directive in ("--requeue", "--open-mode=append", "--array=0-2"):
        assert f"#SBATCH {directive}" in lines
    assert '--rdzv-endpoint "$head_node:$((29500 + SLURM_ARRAY_TASK_ID))"' in script  # tasks on one node: own ports
    with pytest.raises(ValueError, match="needs --requests"):
        sbatch_script(nodes=1, gpus_per_node=2, command=["image"], array=3)
    with pytest.raises(ValueError, match="needs --requests"):
        sbatch_script(nodes=1, gpus_per_node=2, command=["image", "--requests-dir", "d"], array=3)


def test_array_accepts_requests_with_an_equals_sign():
    script = sbatch_script(nodes=1, gpus_per_node=2, command=["image", "--requests=r.jsonl"], array=3)
    assert "#SBATCH --array=0-2" in script.splitlines()
    assert script.rstrip().endswith("-m paragen image --requests=r.jsonl")


def test_cli_passes_cpus_per_task_port_and_array(capfd: pytest.CaptureFixture[str]) -> None:
    from paragen.launch.cli import main

    assert main(["slurm", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "20", "--array", "2",
                 "--", "image", "--requests=r.jsonl"]) == 0
    script = capfd.readouterr().out
    assert "#SBATCH --cpus-per-task=20" in script.splitlines()
    assert "srun --cpus-per-task=20 torchrun" in script
    assert f"$(({SLURM_PORT_BASE} + SLURM_JOB_ID % 10000))" in script
    assert main(["slurm", "--nodes", "1", "--gpus-per-node", "0", "--port", "29700", "--", "llm"]) == 0
    script = capfd.readouterr().out
    assert "srun --cpus-per-task=16 torchrun" in script
    assert '--rdzv-endpoint "$head_node:29700"' in script
    assert main(["slurm", "--nodes", "1", "--gpus-per-node", "1", "--cpus-per-task", "0", "--", "image"]) == 2
    assert "cpus_per_task must be at least 1" in capfd.readouterr().err
