"""Run a script as N real ranks on this machine (gloo), the way torchrun would start them.

The ranks are plain subprocesses with torchrun's environment variables, so a test can watch and kill
one of them; `torchrun` itself is exercised by the CLI tests.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, threads: int = 1) -> dict[str, str]:
    """The environment torchrun gives rank `rank` (one host)."""
    env = dict(os.environ)
    for name in list(env):
        if name.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_")):
            del env[name]
    env.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
        PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def start_ranks(args: list[str], world_size: int, cwd: Path | None = None,
                extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start `python <args>` as `world_size` ranks (`extra_env`: more variables for each); returns the processes
    (stdout/stderr piped)."""
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, *args], env={**rank_env(rank, world_size, port), **(extra_env or {})}, cwd=cwd or ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(world_size)
    ]


def run_ranks(args: list[str], world_size: int, timeout: float = 600, cwd: Path | None = None,
              extra_env: dict[str, str] | None = None) -> list[RankResult]:
    """Run `python <args>` as `world_size` ranks to completion; kill all of them on timeout."""
    procs = start_ranks(args, world_size, cwd, extra_env)
    results = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            results.append(RankResult(rank, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def check_all_ok(results: list[RankResult]) -> None:
    """Fail with every rank's stderr tail if any rank failed."""
    bad = [r for r in results if r.returncode != 0]
    if bad:
        details = "\n".join(f"--- rank {r.rank} exit {r.returncode}\n{r.stderr[-3000:]}" for r in bad)
        raise AssertionError(f"{len(bad)} rank(s) failed:\n{details}")


def run_spec_worker(worker: str, specs: list[dict], world_size: int, folder: Path, timeout: float) -> dict:
    """Run `worker SPEC.json OUT.pt` (see `tests/workers/specs.py`) as `world_size` ranks; return OUT.pt."""
    import json

    import torch

    (folder / "spec.json").write_text(json.dumps(specs))
    check_all_ok(run_ranks([worker, str(folder / "spec.json"), str(folder / "out.pt")], world_size, timeout=timeout))
    return torch.load(folder / "out.pt", weights_only=False)


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), to check that nothing there changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _complete(folder: Path, step: int, world: int) -> bool:
    return all((folder / f"step-{step:06d}" / f"rank-{r}.safetensors").exists() for r in range(world))


def kill_after_checkpoint(procs: list[subprocess.Popen], folder: Path, step: int, timeout: float = 120) -> int:
    """Wait until checkpoint `step` is complete on every rank of a running job, SIGKILL its last rank, let the
    others fail, and return the newest complete step left in `folder`."""
    world = len(procs)
    deadline = time.monotonic() + timeout
    while not _complete(folder, step, world):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint before the end"
        time.sleep(0.02)
    procs[-1].kill()
    for proc in procs:
        proc.communicate(timeout=90)
    assert procs[0].returncode not in (0, None) and procs[-1].returncode != 0
    steps = [int(p.name.split("-")[1]) for p in folder.glob("step-*")]
    return max(s for s in steps if _complete(folder, s, world))


def expect_bad_input(procs: list[subprocess.Popen], message: str, timeout: float = 120) -> None:
    """Every rank of a started job exits with status 2 (bad input) and says `message`."""
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 2, f"rank {rank}: exit {proc.returncode}\n{err[-2000:]}"
        assert message in err, f"rank {rank} did not say {message!r}:\n{err[-2000:]}"
