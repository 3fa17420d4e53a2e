"""Checkpoints: state packing without pickle, scheduler state round trips, and the multi-rank folder rules."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from paragen.pipelines import checkpoint
from paragen.pipelines.checkpoint import (CheckpointError, Checkpoints, load_scheduler_state, pack_state,
                                          scheduler_state, state_file_problem, unpack_state)

FINGERPRINT = {"model": "tiny-sd", "steps": 50, "size": (64, 64), "seed": 0}


def nested_state() -> dict:
    return {
        "latents": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        "mask": torch.tensor([0, 7, 255], dtype=torch.uint8),
        "half": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).t(),  # not contiguous
        "empty": torch.zeros(0, 3, dtype=torch.int64),
        "scheduler": {
            "timesteps": np.array([999, 500, 1], dtype=np.int32),
            "sigmas": np.linspace(1.0, 0.0, 5),
            "big_endian": np.arange(4, dtype=">i4"),
            "history": [None, torch.ones(2, dtype=torch.float16), ("a", 1, 2.5)],
            "step": 3, "flag": True, "off": False, "nothing": None, "name": "ddim",
        },
        "floats": [math.nan, math.inf, -math.inf, -0.0, 0.1, 1e-300],
        "pair": (1, [2, (3,)]),
        "empty_list": [], "empty_tuple": (), "empty_dict": {},
    }


def assert_same(restored, original, path: str = "state") -> None:
    """Equal values of the very same types, tensors with the same dtype, NaN equal to NaN."""
    assert type(restored) is type(original), path
    if isinstance(original, torch.Tensor):
        assert restored.dtype == original.dtype and restored.device == original.device, path
        assert torch.equal(restored, original), path
    elif isinstance(original, np.ndarray):
        assert restored.dtype == original.dtype and np.array_equal(restored, original), path
    elif isinstance(original, dict):
        assert list(restored) == list(original), path
        for key in original:
            assert_same(restored[key], original[key], f"{path}.{key}")
    elif isinstance(original, (list, tuple)):
        assert len(restored) == len(original), path
        for i, (a, b) in enumerate(zip(restored, original)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(original, float) and math.isnan(original):
        assert math.isnan(restored), path
    elif isinstance(original, float):
        assert restored == original and math.copysign(1, restored) == math.copysign(1, original), path
    else:
        assert restored == original, path


def test_pack_unpack_round_trip():
    state = nested_state()
    tensors, skeleton = pack_state(state)
    assert all(t.is_contiguous() for t in tensors.values())
    text = json.dumps(skeleton, allow_nan=False)  # strict JSON: nan/inf are encoded, not written bare
    assert_same(unpack_state(tensors, json.loads(text)), state)


def test_round_trip_through_a_file(tmp_path):
    state = nested_state()
    ckpt = Checkpoints(tmp_path, FINGERPRINT, rank=0, world_size=1)
    path = ckpt.save(10, state)
    assert path == tmp_path / "step-000010" / "rank-0.safetensors"
    assert set(load_file(path)) and json.loads((tmp_path / "run.json").read_text())["world_size"] == 1
    assert_same(ckpt.load(10), state)


def test_packed_tensors_are_copies():
    latents = torch.zeros(3)
    tensors, skeleton = pack_state({"latents": latents})
    latents += 1
    assert torch.equal(unpack_state(tensors, skeleton)["latents"], torch.zeros(3))


@pytest.mark.parametrize("state, path", [
    ({"scheduler": {"foo": object()}}, "scheduler.foo"),
    ({"history": [1, {"x": {1, 2}}]}, "history[1].x"),
    ({"scalar": np.float64(1.0)}, "scalar"),
    ({"names": np.array(["a", "b"])}, "names"),
])
def test_unsupported_type_names_the_path(state, path):
    with pytest.raises(TypeError, match="^" + re.escape(f"{path}: unsupported")):
        pack_state(state)


def test_non_string_keys_are_refused():
    with pytest.raises(TypeError, match=r"^table: dict keys must be str"):
        pack_state({"table": {1: "one"}})


def step_inputs(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randn(1, 4, 8, 8, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("cls", [diffusers.DDIMScheduler, diffusers.EulerDiscreteScheduler,
                                 diffusers.DPMSolverMultistepScheduler])
def test_scheduler_resumes_bit_identical(tmp_path, cls):
    original = cls()
    original.set_timesteps(10)
    latents, *outputs = step_inputs(11)
    for t, model_output in zip(original.timesteps[:3], outputs[:3]):
        latents = original.step(model_output, t, latents).prev_sample
    ckpt = Checkpoints(tmp_path, {"scheduler": cls.__name__}, rank=0, world_size=1)
    ckpt.save(3, {"scheduler": scheduler_state(original), "latents": latents})

    restored = cls()
    restored.set_timesteps(10)
    loaded = ckpt.load(ckpt.resume())
    load_scheduler_state(restored, loaded["scheduler"])
    resumed_latents = loaded["latents"]
    for t, model_output in zip(original.timesteps[3:], outputs[3:]):
        latents = original.step(model_output, t, latents).prev_sample
        resumed_latents = restored.step(model_output, t, resumed_latents).prev_sample
        assert torch.equal(resumed_latents, latents)
    assert not torch.equal(latents, loaded["latents"])  # the remaining steps did run


def test_scheduler_state_is_a_snapshot():
    scheduler = diffusers.DPMSolverMultistepScheduler()
    scheduler.set_timesteps(10)
    state = scheduler_state(scheduler)
    assert "_internal_dict" not in state and "config" not in state
    assert state["model_outputs"] is not scheduler.model_outputs
    scheduler.model_outputs[0] = torch.ones(1)
    assert state["model_outputs"][0] is None


def test_scheduler_state_names_unsupported_attribute():
    scheduler = diffusers.DDIMScheduler()
    scheduler.helper = object()
    with pytest.raises(TypeError, match=r"^helper: unsupported type object"):
        scheduler_state(scheduler)


def two_ranks(folder, fingerprint=FINGERPRINT) -> tuple[Checkpoints, Checkpoints]:
    return (Checkpoints(folder, fingerprint, rank=0, world_size=2),
            Checkpoints(folder, fingerprint, rank=1, world_size=2))


def test_latest_needs_every_rank(tmp_path):
    rank0, rank1 = two_ranks(tmp_path)
    assert rank0.latest() is None and rank1.latest() is None
    rank0.save(10, {"x": torch.zeros(1)})
    assert rank0.latest() is None and rank1.latest() is None
    rank1.save(10, {"x": torch.ones(1)})
    assert rank0.latest() == 10 and rank1.resume() == 10
    assert torch.equal(rank1.load(10)["x"], torch.ones(1))
    (tmp_path / "step-000020").mkdir()
    (tmp_path / "step-000020" / ".rank-0.safetensors.abc.tmp").write_bytes(b"partial")
    (tmp_path / "step-000020" / ".rank-1.safetensors.abc.tmp").write_bytes(b"partial")
    assert rank0.latest() == 10  # leftover temporary files are no checkpoint


def test_pruning_keeps_the_newest_complete_step(tmp_path):
    rank0, rank1 = two_ranks(tmp_path)
    for step in (10, 20):
        rank0.save(step, {"step": step})
        rank1.save(step, {"step": step})
    # each rank prunes only its own files: rank 1 saw step 20 complete, rank 0 did not yet
    assert rank0.path(10).exists() and not rank1.path(10).exists()
    rank0.save(30, {"step": 30})  # rank 1 dies before writing step 30
    assert not (tmp_path / "step-000010").exists()
    assert rank0.path(20).exists() and rank1.path(20).exists() and rank0.latest() == 20
    assert rank1.load(rank1.resume()) == {"step": 20}


def test_pruning_when_another_rank_lags(tmp_path):
    rank0, rank1 = two_ranks(tmp_path)
    rank0.save(10, {"step": 10})
    rank1.save(10, {"step": 10})
    rank0.save(20, {"step": 20})  # rank 1 died before step 20
    assert rank0.path(10).exists() and rank1.path(10).exists()
    assert rank0.latest() == 10 and rank1.resume() == 10
    assert rank0.load(rank0.resume()) == {"step": 10}


def damage(path: Path, keep: int) -> None:
    """`path` as a crash can leave it when the rename reached the disk but not all of the data: `keep` bytes."""
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("keep", [-1, 40, 8, 3, 0], ids=["tail", "header", "length", "short", "empty"])
def test_a_truncated_newest_step_is_not_resumed_from(tmp_path, keep):
    ckpt = Checkpoints(tmp_path, FINGERPRINT, rank=0, world_size=1)
    ckpt.save(10, {"step": 10, "x": torch.arange(100)})
    ckpt.path(20).parent.mkdir()
    ckpt.path(20).write_bytes(ckpt.path(10).read_bytes())  # step 20's file, as whole as step 10's
    assert ckpt.latest() == 20
    damage(ckpt.path(20), keep)
    assert ckpt.latest() == 10 and ckpt.load(ckpt.resume())["step"] == 10
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt.path(20)} is not a whole state file")):
        ckpt.load(20)


def test_a_truncated_only_step_is_refused(tmp_path):
    ckpt = Checkpoints(tmp_path, FINGERPRINT, rank=0, world_size=1)
    ckpt.save(10, {"step": 10, "x": torch.arange(100)})
    ckpt.save(20, {"step": 20, "x": torch.arange(100)})
    assert not ckpt.path(10).exists()  # step 20 verified: step 10 pruned
    damage(ckpt.path(20), -1)
    with pytest.raises(CheckpointError, match=re.escape(f"no complete checkpoint to resume from in {tmp_path}; "
                                                        f"step 20: {ckpt.path(20)}: ")):
        ckpt.resume()


def test_pruning_waits_until_the_newer_step_verifies_on_every_rank(tmp_path):
    rank0, rank1 = two_ranks(tmp_path)
    rank0.save(10, {"step": 10})
    rank1.save(10, {"step": 10})
    rank0.save(20, {"step": 20, "x": torch.zeros(10)})
    damage(rank0.path(20), -4)  # the node of rank 0 crashed: its step 20 lost its tail
    rank1.save(20, {"step": 20})
    assert rank1.path(10).exists() and rank0.path(10).exists()
    assert rank0.latest() == 10 and rank1.load(rank1.resume()) == {"step": 10}


def test_save_verifies_its_own_file(tmp_path, monkeypatch):
    ckpt = Checkpoints(tmp_path, FINGERPRINT, rank=0, world_size=1)
    ckpt.save(10, {"step": 10})

    def lossy_save_file(tensors, filename, metadata):
        save_file(tensors, filename, metadata=metadata)
        damage(Path(filename), -1)

    monkeypatch.setattr(checkpoint, "save_file", lossy_save_file)
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt.path(20)} is not a whole state file")):
        ckpt.save(20, {"step": 20, "x": torch.ones(3)})
    assert ckpt.latest() == 10 and ckpt.load(10) == {"step": 10}


def test_state_file_problem(tmp_path):
    ckpt = Checkpoints(tmp_path, FINGERPRINT, rank=0, world_size=1)
    whole = ckpt.save(10, {"x": torch.ones(3), "y": np.zeros(2)})
    empty = Checkpoints(tmp_path / "empty", FINGERPRINT, rank=0, world_size=1).save(10, {})
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.ones(3)}, str(foreign))  # a safetensors file, but no paragen state
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes((4).to_bytes(8, "little") + b"{no}")
    assert state_file_problem(whole) is None and state_file_problem(empty) is None
    assert state_file_problem(tmp_path / "absent") == "missing"
    assert state_file_problem(foreign) == "no skeleton in its metadata"
    assert state_file_problem(garbage) == "the header is not JSON"
    size = whole.stat().st_size
    damage(whole, size - 1)
    assert state_file_problem(whole) == f"{size - 1} bytes, but its header describes {size}"
    damage(whole, 20)
    assert re.fullmatch(r"a header of \d+ bytes does not fit in 20 bytes", state_file_problem(whole))


def test_check_fresh(tmp_path):
    rank0, rank1 = two_ranks(tmp_path)
    rank0.check_fresh()
    (tmp_path / "run.json").write_text(json.dumps(rank0.run))  # a run that has written nothing else yet
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        rank0.check_fresh()
    (tmp_path / "run.json").unlink()
    rank0.check_fresh()
    rank1.check_fresh()
    rank1.save(10, {"step": 10})
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        rank0.check_fresh()
    (tmp_path / "run.json").unlink()  # state files without run.json: still refused
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        rank0.check_fresh()
    with pytest.raises(CheckpointError, match="no run.json"):
        rank0.latest()


def test_fingerprint_compared_after_json_round_trip(tmp_path):
    Checkpoints(tmp_path, FINGERPRINT, 0, 1).save(5, {})
    as_lists = dict(FINGERPRINT, size=[64, 64])
    assert Checkpoints(tmp_path, as_lists, 0, 1).latest() == 5


def test_a_different_run_is_refused(tmp_path):
    rank0, rank1 = two_ranks(tmp_path)
    rank0.save(10, {"step": 10})
    rank1.save(10, {"step": 10})
    other = Checkpoints(tmp_path, dict(FINGERPRINT, seed=7), rank=0, world_size=2)
    with pytest.raises(CheckpointError, match=r"fingerprint\['seed'\]: saved 0, ours 7") as refused:
        other.resume()
    assert "model" not in str(refused.value)
    with pytest.raises(CheckpointError, match=r"fingerprint\['seed'\]"):
        other.save(20, {"step": 20})
    assert not other.path(20).exists() and rank0.path(10).exists()
    bigger = Checkpoints(tmp_path, FINGERPRINT, rank=0, world_size=4)
    with pytest.raises(CheckpointError, match=r"world_size: saved 2, ours 4"):
        bigger.latest()
    extra = Checkpoints(tmp_path, dict(FINGERPRINT, lora="x"), rank=0, world_size=2)
    with pytest.raises(CheckpointError, match=r"fingerprint\['lora'\]: saved None, ours 'x'"):
        extra.load(10)


def test_resume_without_checkpoint_names_the_folder(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "absent")):
        Checkpoints(tmp_path / "absent", FINGERPRINT, 0, 1).resume()
    rank0, _ = two_ranks(tmp_path)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        rank0.resume()
    rank0.save(10, {"step": 10})  # rank 1 never saved
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        rank0.resume()
    assert isinstance(CheckpointError("x"), ValueError)


def test_bad_rank_and_step(tmp_path):
    with pytest.raises(CheckpointError, match="rank 2"):
        Checkpoints(tmp_path, FINGERPRINT, rank=2, world_size=2)
    with pytest.raises(CheckpointError, match="step"):
        Checkpoints(tmp_path, FINGERPRINT, rank=0, world_size=1).save(-1, {})
    with pytest.raises(CheckpointError, match="no state of rank 0"):
        Checkpoints(tmp_path, FINGERPRINT, rank=0, world_size=1).load(10)
