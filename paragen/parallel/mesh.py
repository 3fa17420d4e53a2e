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
| `sequence`| the token shards of one clip of one CFG branch (patch × ring × ulysses) | the token shard, in sequence order |
| `branch`  | every token shard of one CFG branch (clip × patch × ring × ulysses) | the token shard, in video order |
| `world`   | every rank                                           | the global rank                     |

Token shard `i` of `sequence` is `ring_index × ulysses + ulysses_index`, so one Ulysses group's shards are
contiguous in the sequence and the ring passes contiguous blocks; `branch` shard `clip_index × sequence + i`
holds clip `clip_index`'s shard `i`, so a video transformer's shards over clips are in the video's token order.
"""
from __future__ import annotations

import torch

from paragen.comms import CommStats, GroupComm, backend_name, check_model_device, grid_comms, is_initialized, world_size
from paragen.parallel.config import ParallelConfig

DIMS = ("cfg", "clip", "patch", "ring", "ulysses", "tp")
GROUPS = {"cfg": ("cfg",), "clip": ("clip",), "patch": ("patch",), "ring": ("ring",), "ulysses": ("ulysses",), "tp": ("tp",),
           "sequence": ("patch", "ring", "ulysses"), "branch": ("clip", "patch", "ring", "ulysses"), "world": DIMS}
# Groups whose neighbour/ring P2P, and whose stale all-gathers, get connections of their own.
_P2P_TWINS = ("clip", "patch", "ring", "sequence", "branch")
_STALE_TWINS = ("patch",)


class ParallelMesh:
    """Named groups for a `ParallelConfig` (resolved against the world size here if it is not); all
    communicators share one `CommStats`."""

    def __init__(self, config: ParallelConfig, device: torch.device) -> None:
        """`device`: where the parallelised model's tensors are (checked against the rank's device and backend)."""
        size = world_size()
        self.config = config if config.is_resolved(size) else config.resolve(size)
        c = self.config
        shape = {"cfg": c.cfg, "clip": c.clip, "patch": c.patch, "ring": c.ring * c.seq, "ulysses": c.ulysses,
                 "tp": c.tp}
        check_model_device(device, backend_name() if is_initialized() else None)
        self._comms = grid_comms(shape, GROUPS, _P2P_TWINS, _STALE_TWINS)
        self.stats: CommStats = self._comms["world"].stats

    def group(self, name: str) -> GroupComm:
        """The communicator of group `name` (`cfg`, `clip`, `patch`, `ring`, `ulysses`, `tp`, `sequence`, `branch` or `world`)."""
        return self._comms[name]
