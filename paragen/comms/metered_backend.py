"""Accounting of all-reduces that another library issues through its own communication backend.

DeepSpeed's tensor-parallel layers all-reduce their outputs with `backend.inference_all_reduce(tensor, op,
group)`, which calls torch.distributed itself, past `GroupComm`. `meter_inference_all_reduce` wraps that
method on the backend instance, so that each call over a registered group is counted in the group's
`CommStats` as `GroupComm.all_reduce` counts its own; calls over any other group pass through uncounted.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from paragen.comms.group import GroupComm
from paragen.comms.pending import backend_call


class _MeteredAllReduce:
    """A backend's `inference_all_reduce`, counting the calls over the groups in `groups`."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner
        self.groups: dict[Any, tuple[GroupComm, str]] = {}  # process group -> its communicator and label

    def __call__(self, tensor: Any, op: Any, group: Any = None) -> Any:
        metered = self.groups.get(group)
        if metered is None:
            return self.inner(tensor, op, group)
        comm, label = metered
        volume = 2 * (comm.size - 1) * tensor.numel() * tensor.element_size() // comm.size  # as GroupComm.all_reduce
        comm.stats.record(label, sent=volume, recv=volume)
        start = time.perf_counter()
        with backend_call(label):
            result = self.inner(tensor, op, group)
        comm.stats.add_wait(label, time.perf_counter() - start)
        return result


def meter_inference_all_reduce(backend: Any, comm: GroupComm, label: str) -> None:
    """Count every `backend.inference_all_reduce(tensor, op, group)` over `comm.group` in `comm.stats` under `label`.

    `backend` is any object with that method (DeepSpeed's `deepspeed.comm.comm.cdb`). Its method is wrapped
    once, on the instance; a later call only registers another group (or re-registers this one, with the
    latest `comm` and `label`). Bytes are counted when the call is issued, as `GroupComm.all_reduce` counts
    them; the time blocked is the host's wall time inside the call, with no device synchronisation (as
    `Pending.wait` measures it). A single-process `comm` (no group) has nothing to count.
    """
    if comm.group is None:
        return
    metered = backend.inference_all_reduce
    if not isinstance(metered, _MeteredAllReduce):
        metered = _MeteredAllReduce(metered)
        backend.inference_all_reduce = metered
    metered.groups[comm.group] = (comm, label)
