"""Cutting a prompt into contiguous sequence shards, one per rank of the ring."""
from __future__ import annotations


def shard_bounds(length: int, shards: int) -> list[tuple[int, int]]:
    """`[start, end)` of each of `shards` contiguous pieces of `length` tokens; sizes differ by at most one,
    the earlier shards taking the extra tokens (the last shard also receives every generated token)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if length < shards:
        raise ValueError(f"a prompt of {length} tokens cannot be cut into {shards} non-empty sequence shards")
    base, extra = divmod(length, shards)
    bounds, start = [], 0
    for i in range(shards):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds
