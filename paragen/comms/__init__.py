"""The only package that calls torch.distributed collectives.

`GroupComm` wraps one process group with accounted sync/async operations, `FlatAllGather` packs many
layers' stale activations into one async all-gather, `Pending` is a wait-at-use handle, and
`CommStats` counts bytes, calls and time waited per label. `rank_device` is the device this rank
computes on, chosen once by `paragen.init()`; every group has a gloo twin for host-side metadata.
"""
from paragen.comms.device import DEVICE_CHOICES, check_model_device, default_dtype, rank_device, resolve_device
from paragen.comms.flat_gather import FlatAllGather, Slot
from paragen.comms.group import GroupComm, all_gather_objects, broadcast_int, broadcast_object, world_comm
from paragen.comms.grid import grid_comms
from paragen.comms.metered_backend import meter_inference_all_reduce
from paragen.comms.pending import CommError, Pending, ready
from paragen.comms.stats import CommStats, OpStats
from paragen.comms.world import (
    backend_name,
    is_initialized,
    is_output_rank,
    new_group,
    set_operation_timeout,
    world_groups,
    world_rank,
    world_size,
)
from torch.distributed import ProcessGroup

__all__ = [
    "DEVICE_CHOICES", "check_model_device", "default_dtype", "rank_device", "resolve_device",
    "CommError", "CommStats", "FlatAllGather", "GroupComm", "all_gather_objects", "grid_comms", "broadcast_int",
    "broadcast_object",
    "OpStats", "Pending", "Slot", "ready", "world_comm",
    "meter_inference_all_reduce",
    "ProcessGroup", "backend_name", "is_initialized", "is_output_rank", "new_group", "set_operation_timeout",
    "world_groups", "world_rank", "world_size",
]
