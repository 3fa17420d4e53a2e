"""The device mesh of the job and one accounted communicator per named group.

| name    | who is in it                                   | rank_in_group means            |
|---------|------------------------------------------------|--------------------------------|
| `cfg`   | the ranks holding the same band, both branches | 0 = unconditional, 1 = conditional |
| `patch` | the ranks of one CFG branch, one band each     | the band index, top to bottom  |
| `world` | every rank                                     | the global rank                |

Global rank = cfg_index × patch + patch_index (the mesh is `(cfg, patch)`, row-major).
"""
from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from paragen.comms import CommStats, GroupComm, is_initialized, world_size
from paragen.parallel.config import ParallelConfig


class ParallelMesh:
    """Named groups for a resolved `ParallelConfig`; all communicators share one `CommStats`."""

    def __init__(self, config: ParallelConfig, device_type: str = "cpu") -> None:
        size = world_size()
        self.config = config.resolve(size)
        self.stats = CommStats()
        self._comms: dict[str, GroupComm] = {}
        if size == 1:
            self.device_mesh = None
            for name in ("cfg", "patch", "world"):
                self._comms[name] = GroupComm(None, self.stats)
            return
        if not is_initialized():
            raise RuntimeError("call paragen.init() before parallelising: no process group exists")
        self.device_mesh = init_device_mesh(
            device_type, (self.config.cfg, self.config.patch), mesh_dim_names=("cfg", "patch")
        )
        self._comms["cfg"] = GroupComm(self.device_mesh.get_group("cfg"), self.stats)
        self._comms["patch"] = GroupComm(
            self.device_mesh.get_group("patch"), self.stats, p2p_group=self._second_patch_group()
        )
        self._comms["world"] = GroupComm(dist.group.WORLD, self.stats)

    def _second_patch_group(self) -> dist.ProcessGroup:
        """A second group over this rank's band group, for neighbour P2P.

        Gloo serves one group's traffic over one set of connections; small halo messages queued behind
        a multi-megabyte stale all-gather on the same connections would stall the conv that needs them.
        """
        patch, mine = self.config.patch, None
        for branch in range(self.config.cfg):  # every rank must create every group, in the same order
            group = dist.new_group(list(range(branch * patch, (branch + 1) * patch)))
            if dist.get_rank() // patch == branch:
                mine = group
        return mine

    def comm(self, name: str) -> GroupComm:
        """The communicator of group `name` (`cfg`, `patch` or `world`)."""
        return self._comms[name]
