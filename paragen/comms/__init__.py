"""The only package that calls torch.distributed collectives.

`GroupComm` wraps one process group with accounted sync/async operations, `FlatAllGather` packs many
layers' stale activations into one async all-gather, `Pending` is a wait-at-use handle, and
`CommStats` counts bytes, calls and time waited per label.
"""
from paragen.comms.flat_gather import FlatAllGather, Slot
from paragen.comms.group import GroupComm, all_gather_objects, broadcast_int
from paragen.comms.pending import CommError, Pending, ready
from paragen.comms.stats import CommStats, OpStats
from paragen.comms.world import (
    backend_name,
    is_initialized,
    is_output_rank,
    set_operation_timeout,
    world_rank,
    world_size,
)

__all__ = [
    "CommError", "CommStats", "FlatAllGather", "GroupComm", "all_gather_objects", "broadcast_int", "OpStats", "Pending", "Slot", "ready",
    "backend_name", "is_initialized", "is_output_rank", "set_operation_timeout", "world_rank", "world_size",
]
