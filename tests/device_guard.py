"""Finds tensors that paragen's own code creates without saying on which device.

On a GPU such a tensor lands on the CPU and the first operation that joins it with the model's CUDA tensors
fails (or silently copies every step). On this CPU-only machine both are the CPU, so nothing would fail:
`DeviceGuard` makes the mistake visible here. It is a `TorchFunctionMode` that looks at every tensor factory
call (`torch.zeros`, `torch.arange`, `torch.tensor`, ...) whose caller is a file of the paragen package, and
records the call site when
- no `device=` is given (the tensor goes to the default device, the CPU, whatever the model's device), or
- the device is spelt as a string naming the CPU (a hard-coded host device), outside the few sites that keep
  host-side data on purpose (`HOST_SITES`).
It cannot see: `.cpu()` / `.to("cpu")` copies, a `torch.device("cpu")` object built in paragen and passed on,
CUDA-only behaviour (streams, events, pinned memory, NCCL refusing CPU tensors), or code paths a run does not
take.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import paragen

PACKAGE = str(Path(paragen.__file__).resolve().parent)
FACTORIES = frozenset({
    torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.arange, torch.range, torch.linspace,
    torch.logspace, torch.eye, torch.tensor, torch.scalar_tensor, torch.rand, torch.randn, torch.randint,
    torch.randperm, torch.tril_indices, torch.triu_indices,
})
# (file relative to the package, function): host-side data by design.
HOST_SITES = frozenset({
    ("comms/group.py", "broadcast_int"),  # an integer for the gloo twin group
    ("pipelines/request_args.py", "share_generator"),  # the seed of a generator every rank shares
    ("kernels/chunk_fetch.py", "to_host"),  # the offloaded values' pinned host store (a CUDA run only)
})


def _names_cpu(device: object) -> bool:
    return isinstance(device, str) and device.split(":")[0] == "cpu"


class DeviceGuard(TorchFunctionMode):
    """Records `file:line (function)` of each paragen factory call with no device or a hard-coded host device."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            device = kwargs.get("device")
            if device is None or _names_cpu(device):
                caller = sys._getframe(1)
                path = str(Path(caller.f_code.co_filename).resolve())
                if path.startswith(PACKAGE):
                    relative = path[len(PACKAGE) + 1:]
                    if device is None or (relative, caller.f_code.co_name) not in HOST_SITES:
                        self.sites[f"{relative}:{caller.f_lineno} ({caller.f_code.co_name}, device={device!r})"] += 1
        return func(*args, **kwargs)
