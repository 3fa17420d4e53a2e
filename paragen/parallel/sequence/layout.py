"""How a stream of tokens is cut over the ranks: which slice a rank keeps and how the slices come back together.

A layout answers by the stream's whole length only, so every split of a stream (the image tokens, their rotary
table, their position ids) lands on the same bounds without anyone naming the stream.
- `EvenShards`: every stream in contiguous shards over the sequence group, sizes differing by at most one token
  (any length works);
- `RowShards` (a model that folds its tokens back into their grid, such as SANA's Mix-FFN): the grid's stream in
  shards of whole rows (row counts differing by at most one), any other stream in even shards;
- `ClipShards` (video): the stream of the whole video's tokens by clips and, in each clip, by shards
  (`paragen.parallel.clip.ClipTokens`, over the `branch` group); any other stream (a text) in even shards over the
  clip's sequence group.
"""
from __future__ import annotations

from typing import Protocol

import torch

from paragen.comms import GroupComm
from paragen.parallel.partition import split_sizes


class TokenLayout(Protocol):
    """Where this rank's tokens of a stream are, and how a stream's shards are gathered."""

    def bounds(self, length: int) -> tuple[int, int]:
        """This rank's [start, end) of a stream of `length` tokens."""

    def gather(self, tensor: torch.Tensor, dim: int, length: int, label: str) -> torch.Tensor:
        """Every rank's shard of a stream of `length` tokens, concatenated along `dim` in stream order."""

    def rows(self, whole: int) -> int:
        """This rank's rows of a token grid of `whole` rows (a layout that cuts by whole rows)."""


def _even(length: int, comm: GroupComm) -> list[int]:
    if length < comm.size:
        raise ValueError(f"more ranks than tokens: {comm.size} sequence shards for a sequence of {length} tokens")
    return split_sizes(length, comm.size)


class EvenShards:
    """Every stream in contiguous shards over `comm`."""

    def __init__(self, comm: GroupComm) -> None:
        self.comm = comm

    def sizes(self, length: int) -> list[int]:
        """Every shard's tokens of a stream of `length` tokens."""
        return _even(length, self.comm)

    def bounds(self, length: int) -> tuple[int, int]:
        sizes = self.sizes(length)
        start = sum(sizes[: self.comm.rank])
        return start, start + sizes[self.comm.rank]

    def gather(self, tensor: torch.Tensor, dim: int, length: int, label: str) -> torch.Tensor:
        return self.comm.all_gather_varlen(tensor, dim, self.sizes(length), label)

    def rows(self, whole: int) -> int:
        raise RuntimeError("a plan input counts the rows of the token grid, but this transformer's tokens are not cut "
                           "by whole rows (its class needs a row grid: paragen/pipelines/dit/plans.py ROW_GRIDS)")


class RowShards(EvenShards):
    """The stream of a `grid_rows` × `cols` token grid (row-major) in shards of whole rows over `comm`; other streams
    in even shards."""

    def __init__(self, comm: GroupComm, grid_rows: int, cols: int) -> None:
        super().__init__(comm)
        if grid_rows < comm.size:
            raise ValueError(f"more ranks than token rows: {comm.size} sequence shards for a grid of {grid_rows} rows "
                             "(this model's shards hold whole rows)")
        self.grid_rows, self.cols = grid_rows, cols

    def sizes(self, length: int) -> list[int]:
        if length == self.grid_rows * self.cols:
            return [rows * self.cols for rows in split_sizes(self.grid_rows, self.comm.size)]
        return super().sizes(length)

    def rows(self, whole: int) -> int:
        if whole != self.grid_rows:
            raise RuntimeError(f"a block was given a grid of {whole} rows; this forward's tokens are {self.grid_rows} "
                               "rows")
        return split_sizes(self.grid_rows, self.comm.size)[self.comm.rank]


class ClipShards(EvenShards):
    """The video's token stream by `tokens` (a `ClipTokens`) over `branch`; other streams in even shards over `seq`."""

    def __init__(self, tokens, branch: GroupComm, seq: GroupComm) -> None:
        super().__init__(seq)
        self.tokens, self.branch = tokens, branch

    def bounds(self, length: int) -> tuple[int, int]:
        if length == sum(self.tokens.sizes):
            return self.tokens.bounds(self.branch.rank)
        return super().bounds(length)

    def gather(self, tensor: torch.Tensor, dim: int, length: int, label: str) -> torch.Tensor:
        if length == sum(self.tokens.sizes):
            return self.branch.all_gather_varlen(tensor, dim, self.tokens.sizes, label)
        return super().gather(tensor, dim, length, label)
