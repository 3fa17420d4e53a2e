"""The sbatch script: right numbers, a quoted command that survives the shell, valid bash."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from paragen.launch.slurm import sbatch_script

COMMAND = ["image", "--prompt", "a cat's hat; rm -rf /", "--steps", "$HOME"]


def _run_with_fake_slurm(script: str, tmp_path: Path) -> list[str]:
    """Run the script with stub scontrol/srun/torchrun on PATH; return the argv torchrun got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": '[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"',
        "srun": 'exec "$@"',  # one task here; a real srun starts one per node
        "torchrun": 'for a in "$@"; do printf "%s\\0" "$a"; done > "$ARGV_FILE"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    argv_file = tmp_path / "argv"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "4242", "ARGV_FILE": str(argv_file), "HOME": "/nonexistent"}
    subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, check=True, timeout=30)
    return argv_file.read_text().split("\0")[:-1]


def test_gpu_script_has_the_right_directives_and_launch() -> None:
    script = sbatch_script(nodes=4, gpus_per_node=8, command=COMMAND, job_name="sdxl",
                           time="02:30:00", partition="h100", port=29600)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--job-name=sdxl", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                      "--time=02:30:00", "--partition=h100"):
        assert f"#SBATCH {directive}" in lines
    assert "--cpus-per-task" not in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert "srun torchrun" in script
    for fragment in ("--nnodes 4", "--nproc-per-node 8", "--rdzv-backend c10d",
                     '--rdzv-endpoint "$head_node:29600"', '--rdzv-id "$SLURM_JOB_ID"'):
        assert fragment in script


def test_cpu_script_asks_for_cores_not_gpus() -> None:
    script = sbatch_script(nodes=2, gpus_per_node=0, command=["llm"], cpus_per_task=32)
    assert "gpus" not in script
    assert "#SBATCH --cpus-per-task=32" in script.splitlines()
    assert "srun --cpus-per-task=32 torchrun" in script
    assert "--nproc-per-node 1" in script
    assert "--partition" not in script


@pytest.mark.parametrize("gpus", [0, 8])
def test_script_is_valid_bash(gpus: int, tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(sbatch_script(nodes=2, gpus_per_node=gpus, command=COMMAND))
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_command_reaches_torchrun_verbatim(tmp_path: Path) -> None:
    argv = _run_with_fake_slurm(sbatch_script(nodes=2, gpus_per_node=4, command=COMMAND), tmp_path)
    assert argv == ["--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "gpu07:29500", "--rdzv-id", "4242", "-m", "paragen", *COMMAND]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "nodes must be at least 1"),
        ({"gpus_per_node": -1}, "gpus_per_node must be 0"),
        ({"command": []}, "command must name"),
        ({"port": 0}, "port must be a TCP port"),
        ({"cpus_per_task": 0}, "cpus_per_task must be at least 1"),
        ({"job_name": "two words"}, "job_name must be one word"),
        ({"partition": "gpu\n#SBATCH --x"}, "partition must be one word"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, message: str) -> None:
    arguments = {"nodes": 1, "gpus_per_node": 1, "command": ["image"], **kwargs}
    with pytest.raises(ValueError, match=message):
        sbatch_script(**arguments)


def test_requeue_and_array_split_a_request_file():
    script = sbatch_script(nodes=1, gpus_per_node=2, command=["image", "--requests", "r.jsonl"], requeue=True, array=3)
    lines = script.splitlines()
    for directive in ("--requeue", "--open-mode=append", "--array=0-2"):
        assert f"#SBATCH {directive}" in lines
    assert '--rdzv-endpoint "$head_node:$((29500 + SLURM_ARRAY_TASK_ID))"' in script  # tasks on one node: own ports
    with pytest.raises(ValueError, match="needs --requests"):
        sbatch_script(nodes=1, gpus_per_node=2, command=["image"], array=3)
