"""Tensors paragen creates follow the data's device: each workload's parallel path on 2 real ranks, under
`DeviceGuard` (see tests/device_guard.py for what it can and cannot catch), creates none without a device and
none on a hard-coded host device; and the guard does catch a planted one."""
from __future__ import annotations

import pytest
import torch

from tests.device_guard import PACKAGE, DeviceGuard
from tests.multiproc import run_spec_worker

SPECS = [
    {"name": "unet/displaced", "kind": "image", "model": "tiny-sd", "mode": "displaced", "height": 128, "width": 128},
    {"name": "unet/cfg2_shared_seed", "kind": "image", "model": "tiny-sd", "cfg": 2, "height": 128, "width": 128,
     "shared_seed": True},
    {"name": "unet/partial", "kind": "image", "model": "tiny-sdxl", "mode": "partial", "height": 128, "width": 128},
    {"name": "dit/ulysses", "kind": "image", "model": "tiny-pixart", "ulysses": 2, "height": 128, "width": 128},
    {"name": "dit/ring_displaced", "kind": "image", "model": "tiny-flux", "ring": 2, "mode": "displaced",
     "height": 128, "width": 128},
    {"name": "dit/sd3_ring", "kind": "image", "model": "tiny-sd3", "ring": 2, "height": 128, "width": 128},
    {"name": "hires/async", "kind": "image", "model": "tiny-sd", "guidance": "async", "height": 192, "width": 256},
    {"name": "hires/sync", "kind": "image", "model": "tiny-sd", "guidance": "sync", "height": 192, "width": 256},
    {"name": "video/dual", "kind": "video", "model": "tiny-t2v", "scope": "dual"},
    {"name": "video/full_animatediff_long", "kind": "video", "model": "tiny-animatediff", "scope": "full", "frames": 36},
    {"name": "llm/dense", "kind": "llm", "kv": "dense"},
    {"name": "llm/offload", "kind": "llm", "kv": "offload"},
]


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    return run_spec_worker("tests/workers/device_guard_worker.py", SPECS, 2, tmp_path_factory.mktemp("guard"), 900)


@pytest.mark.slow
@pytest.mark.parametrize("name", [spec["name"] for spec in SPECS])
def test_no_tensor_is_created_off_the_datas_device(findings, name):
    for rank, sites in enumerate(findings[name]["sites"]):
        assert not sites, f"rank {rank} created tensors without the data's device: {sites}"


def test_the_guard_catches_planted_devices():
    # Code compiled under a file name inside the package is paragen's code to the guard.
    planted = {"torch": torch}
    exec(compile(
        "def implicit(x):\n    return x + torch.zeros(3)\n"
        "def hard_coded(x):\n    return x + torch.ones(3, device='cpu')\n"
        "def follows(x):\n    return x + torch.arange(3, device=x.device)\n",
        f"{PACKAGE}/planted.py", "exec"), planted)
    x = torch.ones(3)
    guard = DeviceGuard()
    with guard:
        planted["follows"](x)
        assert not guard.sites
        planted["implicit"](x)
        planted["hard_coded"](x)
        torch.zeros(3)  # not paragen's code: not its business
    assert sorted(guard.sites) == ["planted.py:2 (implicit, device=None)", "planted.py:4 (hard_coded, device='cpu')"]
