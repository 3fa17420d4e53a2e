"""Cutting a prompt into contiguous sequence shards, one per rank of the ring."""
from __future__ import annotations

from paragen.parallel.partition import split_bounds


def shard_bounds(length: int, shards: int) -> list[tuple[int, int]]:
    """`[start, end)` of each of `shards` contiguous pieces of `length` tokens (`split_bounds`: sizes differ by
    at most one, the earlier shards taking the extra tokens; the last shard also receives every generated token)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if length < shards:
        raise ValueError(f"a prompt of {length} tokens cannot be cut into {shards} non-empty sequence shards")
    return [split_bounds(length, shards, i) for i in range(shards)]
