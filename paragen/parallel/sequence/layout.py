"""How a token sequence is cut into contiguous shards whose sizes differ by at most one."""
from __future__ import annotations


def shard_sizes(tokens: int, parts: int) -> list[int]:
    """Tokens of each of `parts` contiguous shards; the first `tokens % parts` get one more."""
    if parts < 1:
        raise ValueError(f"cannot cut a sequence into {parts} shards")
    base, extra = divmod(tokens, parts)
    return [base + (i < extra) for i in range(parts)]


def shard_bounds(tokens: int, parts: int, index: int) -> tuple[int, int]:
    """`[start, stop)` of shard `index` of `shard_sizes(tokens, parts)`."""
    sizes = shard_sizes(tokens, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]
