"""The one contiguous split (`partition.split_sizes` / `split_bounds`) against expectations written apart from it,
and the helpers that cut a length with it (LLM prompt shards, row bands, clips) agreeing with it."""
from __future__ import annotations

import pytest

from paragen.parallel.clip import TemporalAttention, plan_clips
from paragen.parallel.llm.shards import shard_bounds
from paragen.parallel.partition import band_bounds, split_bounds, split_sizes


def dealt_sizes(total: int, parts: int) -> list[int]:
    """Expected sizes, by dealing `total` items one at a time to the pieces in turn."""
    sizes = [0] * parts
    for item in range(total):
        sizes[item % parts] += 1
    return sizes


def labelled_bounds(total: int, parts: int) -> list[tuple[int, int]]:
    """Expected bounds, from labelling every item with its piece (pieces in order, sizes as dealt)."""
    labels = [piece for piece, size in enumerate(dealt_sizes(total, parts)) for _ in range(size)]
    bounds = []
    for piece in range(parts):
        where = [i for i, label in enumerate(labels) if label == piece]
        start = where[0] if where else (bounds[-1][1] if bounds else 0)
        bounds.append((start, where[-1] + 1 if where else start))
    return bounds


@pytest.mark.parametrize("total, parts, sizes", [
    (10, 4, [3, 3, 2, 2]), (18, 4, [5, 5, 4, 4]), (8, 4, [2, 2, 2, 2]), (81, 2, [41, 40]), (7, 1, [7]),
    (5, 5, [1, 1, 1, 1, 1]), (3, 4, [1, 1, 1, 0]), (0, 3, [0, 0, 0]), (13, 5, [3, 3, 3, 2, 2]),
])
def test_hand_written_sizes(total, parts, sizes):
    assert split_sizes(total, parts) == sizes


@pytest.mark.parametrize("total, parts, bounds", [
    (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]), (18, 4, [(0, 5), (5, 10), (10, 14), (14, 18)]),
    (24, 4, [(0, 6), (6, 12), (12, 18), (18, 24)]), (3, 4, [(0, 1), (1, 2), (2, 3), (3, 3)]), (7, 1, [(0, 7)]),
])
def test_hand_written_bounds(total, parts, bounds):
    assert [split_bounds(total, parts, i) for i in range(parts)] == bounds


def test_every_small_split_against_brute_force():
    for parts in range(1, 13):
        for total in range(0, 60):
            sizes = split_sizes(total, parts)
            assert sizes == dealt_sizes(total, parts), (total, parts)
            assert len(sizes) == parts and sum(sizes) == total
            assert max(sizes) - min(sizes) <= 1
            assert all(a >= b for a, b in zip(sizes, sizes[1:])), "earlier pieces take the extra"
            bounds = [split_bounds(total, parts, i) for i in range(parts)]
            assert bounds == labelled_bounds(total, parts), (total, parts)
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), "contiguous"
            assert [stop - start for start, stop in bounds] == sizes


def test_refusals():
    for parts in (0, -1):
        with pytest.raises(ValueError, match=f"cannot split 5 into {parts} parts"):
            split_sizes(5, parts)
        with pytest.raises(ValueError, match="cannot split"):
            split_bounds(5, parts, 0)
    for index in (-1, 4):
        with pytest.raises(IndexError):
            split_bounds(10, 4, index)


def test_the_users_cut_with_it():
    assert shard_bounds(10, 4) == [split_bounds(10, 4, i) for i in range(4)]
    with pytest.raises(ValueError, match="a prompt of 3 tokens cannot be cut into 4 non-empty sequence shards"):
        shard_bounds(3, 4)
    with pytest.raises(ValueError, match="shards must be >= 1, got 0"):
        shard_bounds(3, 0)
    assert [band_bounds(24, 4, i) for i in range(4)] == [split_bounds(24, 4, i) for i in range(4)]
    with pytest.raises(ValueError, match="10 rows do not split into 4 equal bands"):
        band_bounds(10, 4, 0)
    layout = plan_clips(18, 4, TemporalAttention(local=1, global_frames=2), conv_halo=0)
    assert list(layout.sizes) == split_sizes(18, 4)
    assert [layout.bounds(i) for i in range(4)] == [split_bounds(18, 4, i) for i in range(4)]
