"""Process groups over a grid of ranks: one accounted `GroupComm` per named set of grid dimensions.

Ranks are laid out row-major over the grid's dimensions (the last varies fastest). A named group over
some dimensions holds, for each rank, the ranks that differ from it only along those dimensions.
"""
from __future__ import annotations

import itertools

from paragen.comms.group import GroupComm
from paragen.comms.stats import CommStats
from paragen.comms.world import is_initialized, new_group, world_groups, world_rank, world_size
from torch.distributed import ProcessGroup


def grid_comms(shape: dict[str, int], groups: dict[str, tuple[str, ...]], p2p_twins: tuple[str, ...] = (),
               stale_twins: tuple[str, ...] = ()) -> dict[str, GroupComm]:
    """This rank's `GroupComm` of every group in `groups` (name -> grid dimensions), all sharing one `CommStats`.

    `shape`: the grid's dimensions in layout order and their extents (product: the world size). Groups
    named in `p2p_twins` / `stale_twins` get separate connections for neighbour/ring P2P and for the
    step-long stale all-gathers (see `GroupComm`). Every rank must call this with the same arguments.
    """
    size = world_size()
    if size > 1 and not is_initialized():
        raise RuntimeError("call paragen.init() before parallelising: no process group exists")
    grid = _Grid(tuple(shape), tuple(shape.values()), world_rank())
    stats = CommStats()
    # One group (and its host-side twin) per distinct rank set; the whole world is the default group.
    made: dict[tuple[int, ...], tuple[ProcessGroup, ProcessGroup]] = {}
    if size > 1:
        made[tuple(range(size))] = world_groups()
    comms = {}
    for name, dims in groups.items():
        group, cpu = grid.group(dims, made) or (None, None)
        p2p = grid.group(dims, {}) if name in p2p_twins and group is not None else None
        stale = grid.group(dims, {}) if name in stale_twins and group is not None else None
        comms[name] = GroupComm(group, stats, p2p_group=p2p and p2p[0], stale_group=stale and stale[0], cpu_group=cpu)
    return comms


class _Grid:
    def __init__(self, dims: tuple[str, ...], extents: tuple[int, ...], rank: int) -> None:
        self.dims, self.extents, self.rank = dims, extents, rank

    def group(self, dims: tuple[str, ...], made: dict) -> tuple[ProcessGroup, ProcessGroup] | None:
        """This rank's group over `dims` and its host-side twin (None when it holds one rank).

        Every rank creates every group of the partition, in the same order, as torch.distributed
        requires. With `made` empty a new group is created even for a rank set that exists already
        (the P2P and stale twins).
        """
        members = [i for i, d in enumerate(self.dims) if d in dims]
        if all(self.extents[i] == 1 for i in members):
            return None
        mine = None
        fixed = [i for i in range(len(self.dims)) if i not in members]
        for outer in itertools.product(*(range(self.extents[i]) for i in fixed)):
            ranks = []
            for inner in itertools.product(*(range(self.extents[i]) for i in members)):
                coord = [0] * len(self.dims)
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
        for value, extent in zip(coord, self.extents):
            rank = rank * extent + value
        return rank
