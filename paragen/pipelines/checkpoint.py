"""Checkpoints of long denoising jobs, so that a killed multi-rank run resumes with bit-identical output.

On-disk layout of a checkpoint folder:

    folder/run.json                          {"fingerprint": {...}, "world_size": N}, the same on every rank
    folder/step-000010/rank-0.safetensors    rank 0's state after step 10
    folder/step-000010/rank-1.safetensors    ...

Each rank writes only its own files. A state file holds the tensors (and numpy arrays) of a nested state in
safetensors; the rest of the state (dicts, lists, tuples, numbers, strings, None) is a JSON skeleton kept in
its metadata under "skeleton", whose leaves name the tensors. Nothing is pickled. Every file is written to a
temporary file in the same folder, fsynced, renamed into place and its folder fsynced (outputs.write_atomic),
so that a file that exists is whole, even after a crash of the node; leftover `*.tmp` files of a killed writer
are ignored. As a disk or filesystem that drops fsync can still leave a truncated file, a file counts only when
it verifies: its safetensors header parses, holds the skeleton, and the file's size is exactly what the header
describes (no tensor is read for that). A step is complete when the file of every rank verifies; resuming starts
from the newest complete step, and a rank deletes its files of older steps only once a newer step is complete,
so one complete checkpoint always survives.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from paragen.pipelines.outputs import save_json, write_atomic

STEP_DIR = re.compile(r"step-(\d+)")
SCHEDULER_CONFIG = ("config", "_internal_dict")
# Request fields a resumed run may change: where the outputs and checkpoints go, how often it saves.
RESUMABLE_CHANGES = ("out_dir", "name", "checkpoint_dir", "checkpoint_every", "resume")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used: another run's, already used, holding nothing to resume, or a state
    file that is not whole."""


def state_file_problem(path: Path) -> str | None:
    """Why `path` is no whole state file (missing, truncated, not safetensors, no skeleton), or None when it is.
    Reads the header only: an 8-byte little-endian length N, N bytes of JSON naming each tensor's byte range in
    the data that follows, and "__metadata__"."""
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < 8:
                return f"{size} bytes, too short for the header length"
            (length,) = struct.unpack("<Q", file.read(8))
            if 8 + length > size:
                return f"a header of {length} bytes does not fit in {size} bytes"
            header = json.loads(file.read(length))
    except FileNotFoundError:
        return "missing"
    except ValueError:  # bad JSON or UTF-8
        return "the header is not JSON"
    metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("skeleton"), str):
        return "no skeleton in its metadata"
    try:
        end = max((int(tensor["data_offsets"][1]) for tensor in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return "a tensor entry of the header has no data_offsets"
    if size != 8 + length + end:
        return f"{size} bytes, but its header describes {8 + length + end}"
    return None


def check_state_file(path: Path) -> None:
    """CheckpointError naming `path` unless it is a whole state file (state_file_problem)."""
    if (problem := state_file_problem(path)) is not None:
        raise CheckpointError(f"{path} is not a whole state file: {problem}")


def pack_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Nested state -> (flat tensors for safetensors, JSON-able skeleton)."""
    tensors: dict[str, torch.Tensor] = {}

    def pack(value: Any, path: str) -> Any:
        kind = type(value)
        if value is None or kind in (bool, int, str):
            return value
        if kind is float:  # repr() round-trips exactly and spells nan/inf, which strict JSON has not
            return {"float": repr(value)}
        if kind is dict:
            if not all(type(key) is str for key in value):
                raise TypeError(f"{path or '<state>'}: dict keys must be str")
            return {"dict": {key: pack(item, f"{path}.{key}" if path else key) for key, item in value.items()}}
        if kind in (list, tuple):
            return {kind.__name__: [pack(item, f"{path}[{i}]") for i, item in enumerate(value)]}
        name = str(len(tensors))
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            return {"tensor": name, "device": str(value.device)}
        if isinstance(value, np.ndarray):
            native = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("="))
            try:
                tensors[name] = torch.from_numpy(native).clone()
            except TypeError as err:
                raise TypeError(f"{path}: unsupported numpy dtype {value.dtype}") from err
            return {"ndarray": name, "dtype": value.dtype.str}
        raise TypeError(f"{path}: unsupported type {kind.__qualname__}")

    return tensors, pack(state, "")


def unpack_state(tensors: dict[str, torch.Tensor], skeleton: dict) -> dict[str, Any]:
    """(tensors, skeleton) of pack_state -> the nested state; tensors go back to the device they were saved from."""

    def unpack(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if "float" in node:
            return float(node["float"])
        if "dict" in node:
            return {key: unpack(item) for key, item in node["dict"].items()}
        if "list" in node:
            return [unpack(item) for item in node["list"]]
        if "tuple" in node:
            return tuple(unpack(item) for item in node["tuple"])
        if "tensor" in node:
            return tensors[node["tensor"]].to(node["device"])
        if "ndarray" in node:
            return tensors[node["ndarray"]].numpy().astype(np.dtype(node["dtype"]), copy=False)
        raise CheckpointError(f"unknown node in checkpoint skeleton: {sorted(node)}")

    return unpack(skeleton)


def scheduler_state(scheduler) -> dict[str, Any]:
    """The mutable state of a diffusers scheduler: every attribute in vars(scheduler) except its config
    ('config', '_internal_dict') and functions set on the instance (wrappers), as a copy that later steps of
    the scheduler do not change. Unsupported attribute types raise TypeError naming the attribute."""
    state = {name: value for name, value in vars(scheduler).items()
             if name not in SCHEDULER_CONFIG and not callable(value)}
    return unpack_state(*pack_state(state))


def load_scheduler_state(scheduler, state: dict[str, Any]) -> None:
    """Set every attribute of `state` on the scheduler (inverse of scheduler_state)."""
    for name, value in state.items():
        setattr(scheduler, name, value)


class Checkpoints:
    """One rank's view of a checkpoint folder shared by the `world_size` ranks of one run."""

    def __init__(self, folder: str | Path, fingerprint: dict, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise CheckpointError(f"rank {rank} is outside a world of size {world_size}")
        self.folder = Path(folder)
        self.run = {"fingerprint": json.loads(json.dumps(fingerprint)), "world_size": world_size}
        self.rank = rank
        self.world_size = world_size

    def path(self, step: int, rank: int | None = None) -> Path:
        """The state file of `rank` (default: ours) for `step`."""
        return self.folder / f"step-{step:06d}" / f"rank-{self.rank if rank is None else rank}.safetensors"

    def check_fresh(self) -> None:
        """Refuse (CheckpointError) a folder that already holds a checkpoint of any run: a fresh start must never
        overwrite one."""
        if (self.folder / "run.json").exists() or any(self.folder.glob("step-*/rank-*.safetensors")):
            raise CheckpointError(f"{self.folder} already holds a checkpoint: resume from it, or pick another folder")

    def latest(self) -> int | None:
        """The newest complete step (every rank's file verifies); None when there is none.
        CheckpointError if the folder belongs to a different run (fingerprint or world size differ)."""
        self._check_run()
        return next((step for step in reversed(self._steps()) if not self._problems(step)), None)

    def resume(self) -> int:
        """latest(), but CheckpointError if there is no complete checkpoint, naming the newest step's bad files."""
        step = self.latest()
        if step is None:
            steps = self._steps()
            newest = f"; step {steps[-1]}: " + "; ".join(self._problems(steps[-1])) if steps else ""
            raise CheckpointError(f"no complete checkpoint to resume from in {self.folder}{newest}")
        return step

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write this rank's state for `step` atomically and durably (run.json too, identical on every rank) and
        verify it (CheckpointError if it is not whole), then delete this rank's files of steps older than the newest
        complete step, so one complete checkpoint always survives."""
        if type(step) is not int or step < 0:
            raise CheckpointError(f"a checkpoint step must be an int >= 0, not {step!r}")
        self._check_run()
        tensors, skeleton = pack_state(state)
        save_json(self.run, self.folder / "run.json")
        path = self.path(step)
        metadata = {"skeleton": json.dumps(skeleton, allow_nan=False)}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        check_state_file(path)
        newest = self.latest()
        for old in [old for old in self._steps() if newest is not None and old < newest]:
            self.path(old).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the folder goes once every rank's file is gone
                self.path(old).parent.rmdir()
        return path

    def load(self, step: int) -> dict[str, Any]:
        """This rank's state of `step`; CheckpointError if its file is missing or not whole."""
        self._check_run()
        path = self.path(step)
        if not path.exists():
            raise CheckpointError(f"{path} does not exist: no state of rank {self.rank} for step {step}")
        check_state_file(path)
        with safe_open(str(path), framework="pt", device="cpu") as file:
            skeleton = json.loads(file.metadata()["skeleton"])
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        return unpack_state(tensors, skeleton)

    def _problems(self, step: int) -> list[str]:
        """What keeps `step` from being complete: each rank's file that does not verify, and why."""
        paths = [self.path(step, rank) for rank in range(self.world_size)]
        return [f"{path}: {problem}" for path in paths if (problem := state_file_problem(path)) is not None]

    def _steps(self) -> list[int]:
        """Steps that have a folder, complete or not, in ascending order."""
        entries = self.folder.iterdir() if self.folder.is_dir() else []
        return sorted(int(m.group(1)) for e in entries if e.is_dir() and (m := STEP_DIR.fullmatch(e.name)))

    def _check_run(self) -> None:
        """CheckpointError if run.json is another run's; a folder with state files but no run.json is foreign too."""
        run_file = self.folder / "run.json"
        if not run_file.exists():
            if any(self.folder.glob("step-*/rank-*.safetensors")):
                raise CheckpointError(f"{self.folder} holds state files but no run.json")
            return
        saved = json.loads(run_file.read_text())
        theirs, ours = saved.get("fingerprint", {}), self.run["fingerprint"]
        differ = [f"fingerprint[{key!r}]: saved {theirs.get(key)!r}, ours {ours.get(key)!r}"
                  for key in sorted(theirs.keys() | ours.keys()) if theirs.get(key) != ours.get(key)]
        if saved.get("world_size") != self.world_size:
            differ.append(f"world_size: saved {saved.get('world_size')!r}, ours {self.world_size!r}")
        if differ:
            raise CheckpointError(f"{self.folder} belongs to a different run: " + "; ".join(differ))


def first_step(checkpoints: Checkpoints, resume: bool) -> int:
    """Where a run using `checkpoints` starts: step 0 of a fresh run, which refuses a folder that holds a
    checkpoint already, or the newest complete step of the run being resumed."""
    if resume:
        return checkpoints.resume()
    checkpoints.check_fresh()
    return 0


def run_fingerprint(request: dict[str, Any], config: dict[str, Any], skip: tuple[str, ...]) -> dict[str, Any]:
    """What a resumed run must share with the saved one: the request (less the keys in `skip`, which may
    change between the two) and the resolved parallel config, as flat `request.*` / `config.*` keys."""
    fingerprint = {f"request.{k}": v for k, v in request.items() if k not in skip}
    fingerprint.update({f"config.{k}": v for k, v in config.items()})
    return fingerprint


@dataclass
class StepCheckpoints:
    """When a denoising loop saves and restores: every `every` steps, and from `resume_step` on a resume."""

    checkpoints: Checkpoints
    every: int
    resume_step: int

    @classmethod
    def open(cls, checkpoints: Checkpoints, every: int, resume: bool) -> "StepCheckpoints":
        """Check the folder (fresh, or a complete checkpoint of this run) before any collective."""
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {every}")
        return cls(checkpoints, every, first_step(checkpoints, resume))

    def skipped(self, step: int) -> bool:
        """Step `step` was done before the interruption: its result is restored, not computed."""
        return step < self.resume_step

    def restores_after(self, step: int) -> bool:
        """The state saved after step `step` is loaded at its end (the last skipped step)."""
        return self.resume_step > 0 and step == self.resume_step - 1

    def saves_after(self, step: int, total: int) -> bool:
        """A checkpoint is written after step `step` of `total` (not after the last, nor one already saved)."""
        done = step + 1
        return done % self.every == 0 and done < total and done > self.resume_step

    def save(self, step: int, scheduler, generator, latents: torch.Tensor, **more: Any) -> None:
        """Write this rank's state after step `step`: `latents` (its part), the scheduler's and the generator's
        states, and `more` (a workload's own)."""
        self.checkpoints.save(step + 1, {"latents": latents, "scheduler": scheduler_state(scheduler),
                                         "generator": generator_states(generator), **more})

    def restore(self, scheduler, generator) -> dict[str, Any]:
        """Load the state saved at the resume step into `scheduler` and `generator`; return the whole state."""
        state = self.checkpoints.load(self.resume_step)
        load_scheduler_state(scheduler, state["scheduler"])
        set_generator_states(generator, state["generator"])
        return state


def generator_states(generator) -> Any:
    """The state of a torch generator, or of each of a list of them (None for None)."""
    if generator is None:
        return None
    if isinstance(generator, list):
        return [g.get_state() for g in generator]
    return generator.get_state()


def set_generator_states(generator, states) -> None:
    """Inverse of `generator_states`."""
    if isinstance(generator, list):
        for g, state in zip(generator, states):
            g.set_state(state)
    elif generator is not None:
        generator.set_state(states)
