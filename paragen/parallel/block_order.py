"""The order in which a model's blocks run, learned from its first forward, so that each block can start bringing
in the next one's weights (an all-gather of its shards, or a copy from host memory) while it computes.

Diffusers and transformers models run their blocks in the same order on every forward, but not always in module
order (a UNet's mid block is declared after its up blocks), so the order is read from the first forward rather than
from the module tree. A block that runs twice in a row is not its own successor.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class BlockOrder:
    """Calls `ahead(next_block)` as each block starts, from the second forward of `root` on; `after()` after every
    forward of `root`."""

    def __init__(self, root: torch.nn.Module, blocks: Sequence[torch.nn.Module],
                 ahead: Callable[[torch.nn.Module], None], after: Callable[[], None] | None = None) -> None:
        self.order: list[torch.nn.Module] = []  # the blocks as the first forward ran them
        self.prefetches = 0  # blocks brought in ahead of their turn
        self._next: dict[int, torch.nn.Module] | None = None
        self._ahead, self._after = ahead, after
        for block in blocks:
            block.register_forward_pre_hook(lambda module, args: self._started(module))
        root.register_forward_hook(lambda module, args, output: self._finished())

    def _started(self, block: torch.nn.Module) -> None:
        if self._next is None:
            self.order.append(block)
            return
        following = self._next.get(id(block))
        if following is not None:
            self._ahead(following)
            self.prefetches += 1

    def _finished(self) -> None:
        if self._next is None:
            self._next = {id(a): b for a, b in zip(self.order, self.order[1:]) if a is not b}
        if self._after is not None:
            self._after()


__all__ = ["BlockOrder"]
