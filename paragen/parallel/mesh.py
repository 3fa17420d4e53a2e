"""The layout of the job's ranks and one accounted communicator per named group.

Ranks are laid out row-major over `(cfg, clip, patch, ring, ulysses, tp)`:
global rank = ((((cfg_index × clip + clip_index) × patch + patch_index) × ring + ring_index) × ulysses
+ ulysses_index) × tp + tp_index.
A UNet uses `patch`; a diffusion transformer uses `ring` and `ulysses` (its patch degree is 1); a video
model uses `clip`; a causal LM puts its `seq` shards on `ring` and its tensor-parallel ranks on `tp`
(innermost, so the ranks splitting one shard's weights are neighbours — on one node).

| name      | who is in it                                         | rank_in_group means                 |
|-----------|------------------------------------------------------|-------------------------------------|
| `cfg`     | the ranks holding the same shard, both branches      | 0 = unconditional, 1 = conditional  |
| `clip`    | the ranks holding one video's clips                  | the clip index, in frame order      |
| `patch`   | the ranks of one CFG branch, one band each (hires: one share of the windows) | the band index, top to bottom |
| `ring`    | the ranks passing K/V around one ring (a causal LM's sequence shards) | the position on the ring |
| `ulysses` | the ranks trading sequence shards for head shards    | the head group                      |
| `tp`      | the ranks splitting one shard's weights (tensor parallelism) | the weight shard          |
| `seq`     | every shard of one CFG branch (patch × ring × ulysses) | the token shard, in sequence order |
| `world`   | every rank                                           | the global rank                     |

Token shard `i` of `seq` is `ring_index × ulysses + ulysses_index`, so one Ulysses group's shards are
contiguous in the sequence and the ring passes contiguous blocks.
"""
from __future__ import annotations

import itertools

import torch

from paragen.comms import (CommStats, GroupComm, ProcessGroup, backend_name, check_model_device, is_initialized,
                           new_group, world_groups, world_rank, world_size)
from paragen.parallel.config import ParallelConfig

DIMS = ("cfg", "clip", "patch", "ring", "ulysses", "tp")
_GROUPS = {"cfg": ("cfg",), "clip": ("clip",), "patch": ("patch",), "ring": ("ring",), "ulysses": ("ulysses",), "tp": ("tp",),
           "seq": ("patch", "ring", "ulysses"), "world": DIMS}
# Groups whose neighbour/ring P2P, and whose stale all-gathers, get connections of their own.
_P2P_TWINS = ("clip", "patch", "ring", "seq")
_STALE_TWINS = ("patch",)


class ParallelMesh:
    """Named groups for a resolved `ParallelConfig`; all communicators share one `CommStats`."""

    def __init__(self, config: ParallelConfig, device: torch.device) -> None:
        """`device`: where the parallelised model's tensors are (checked against the rank's device and backend)."""
        size = world_size()
        self.config = config.resolve(size)
        self.stats = CommStats()
        self.shape = tuple(self.config.ring_positions if d == "ring" else getattr(self.config, d) for d in DIMS)
        if size > 1 and not is_initialized():
            raise RuntimeError("call paragen.init() before parallelising: no process group exists")
        check_model_device(device, backend_name() if is_initialized() else None)
        self.rank = world_rank()
        self._comms: dict[str, GroupComm] = {}
        # One group (and its host-side twin) per distinct rank set; the whole world is the default group.
        made: dict[tuple[int, ...], tuple[ProcessGroup, ProcessGroup]] = {}
        if size > 1:
            made[tuple(range(size))] = world_groups()
        for name, dims in _GROUPS.items():
            group, cpu = self._group(dims, made) or (None, None)
            p2p = self._group(dims, {}) if name in _P2P_TWINS and group is not None else None
            stale = self._group(dims, {}) if name in _STALE_TWINS and group is not None else None
            self._comms[name] = GroupComm(group, self.stats, p2p_group=p2p and p2p[0], stale_group=stale and stale[0],
                                          cpu_group=cpu)

    def _group(self, dims: tuple[str, ...], made: dict) -> tuple[ProcessGroup, ProcessGroup] | None:
        """This rank's group over `dims` and its host-side twin (None when it holds one rank).

        Every rank creates every group of the partition, in the same order, as torch.distributed
        requires. With `made` empty a new group is created even for a rank set that exists already
        (the P2P and stale twins; see `GroupComm`).
        """
        members = [i for i, d in enumerate(DIMS) if d in dims]
        if all(self.shape[i] == 1 for i in members):
            return None
        mine = None
        fixed = [i for i in range(len(DIMS)) if i not in members]
        for outer in itertools.product(*(range(self.shape[i]) for i in fixed)):
            ranks = []
            for inner in itertools.product(*(range(self.shape[i]) for i in members)):
                coord = [0] * len(DIMS)
                for i, v in zip(fixed, outer):
                    coord[i] = v
                for i, v in zip(members, inner):
                    coord[i] = v
                ranks.append(self._global(coord))
            key = tuple(ranks)
            if key not in made:
                made[key] = new_group(ranks)
            if self.rank in ranks:
                mine = made[key]
        return mine

    def _global(self, coord: list[int]) -> int:
        rank = 0
        for value, extent in zip(coord, self.shape):
            rank = rank * extent + value
        return rank

    def comm(self, name: str) -> GroupComm:
        """The communicator of group `name` (`cfg`, `clip`, `patch`, `ring`, `ulysses`, `tp`, `seq` or `world`)."""
        return self._comms[name]
