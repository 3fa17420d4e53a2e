"""One place decides the device: `resolve_device` for each request and node, `default_dtype`, the model-device
check, gloo twins for host-side metadata beside NCCL groups, and `--device cuda` refused at once without CUDA."""
from __future__ import annotations

import json
import time

import pytest
import torch

from paragen.comms import check_model_device, default_dtype, resolve_device
from tests.multiproc import check_all_ok, expect_bad_input, run_ranks, start_ranks


@pytest.fixture
def two_gpus(monkeypatch):
    """A node with two CUDA devices, as far as device choice can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_the_local_ranks_gpu(two_gpus):
    assert resolve_device("auto", 0) == torch.device("cuda", 0)
    assert resolve_device("cuda", 1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", 1) == torch.device("cuda", 0)  # ranks may share one GPU when asked
    assert resolve_device("cpu", 1) == torch.device("cpu")


def test_more_ranks_than_gpus_is_refused(two_gpus):
    with pytest.raises(ValueError, match="2 CUDA device"):
        resolve_device("auto", 2)
    with pytest.raises(ValueError, match="cuda:5 does not exist"):
        resolve_device("cuda:5", 0)


def test_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 3) == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda", 0)
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu", 0)


def test_default_dtype(monkeypatch):
    assert default_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert default_dtype(torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert default_dtype(torch.device("cuda", 0)) == torch.float16


def test_a_cpu_model_under_nccl_is_refused():
    with pytest.raises(ValueError, match="NCCL"):
        check_model_device(torch.device("cpu"), "nccl")
    check_model_device(torch.device("cpu"), "gloo")


def test_groups_get_gloo_twins_under_nccl(tmp_path):
    out = tmp_path / "seen.pt"
    check_all_ok(run_ranks(["tests/workers/twin_groups_worker.py", str(out)], 4, timeout=300))
    seen = torch.load(out, weights_only=False)
    for rank, mine in enumerate(seen):
        assert mine["world_twin"] and all(mine[name]["twin"] for name in ("cfg", "patch", "world"))
        assert (mine["cfg"]["size"], mine["patch"]["size"], mine["world"]["size"]) == (2, 2, 4)
        # patch groups are ranks {0, 1} and {2, 3}: each shares its first rank's integer
        assert mine["seed"] == 1000 + (rank // 2) * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
def test_device_cuda_without_cuda_fails_at_once_on_every_rank(tmp_path):
    start = time.monotonic()
    procs = start_ranks(["-m", "paragen", "image", "--device", "cuda", "--steps", "1", "--out", str(tmp_path)], 2)
    expect_bad_input(procs, "no CUDA device is visible")
    assert time.monotonic() - start < 60
    assert not any(tmp_path.iterdir())


def test_report_names_device_and_dtype(tmp_path):
    procs = start_ranks(["-m", "paragen", "image", "--height", "64", "--width", "64", "--steps", "1",
                         "--out", str(tmp_path), "--name", "r"], 1)
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["device"], report["dtype"]) == ("cpu", "float32")
