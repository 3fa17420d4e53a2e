"""`HostStore`: a shard's exact keys and values in host memory, streamed to the device for every attention —
the full cache of speculative decoding in TriForce's offloaded setting.

Speculative decoding reads the full cache only to verify a block of drafted tokens, so it can live where memory
is plentiful: host memory (pinned on CUDA). Each attention copies the layer's keys and values to the device in
blocks of `block` tokens, the next block's copy in flight while the current block is attended, and merges the
blocks' partial attentions by log-sum-exp: the same attention as `DenseStore`'s, summed in another order.
The device holds two blocks at a time instead of the shard.
"""
from __future__ import annotations

import time

import torch

from paragen.kernels.attention import grouped_query_attention_with_lse, merge_attention_states
from paragen.kernels.chunk_fetch import ChunkFetcher, to_host
from paragen.parallel.llm.dense_store import DenseStore


class HostStore(DenseStore):
    """Keys and values `[B, Hkv, S, D]` of one layer's shard in host memory; `grows` as for `DenseStore`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, grows: bool, fetcher: ChunkFetcher, block: int) -> None:
        super().__init__(to_host(keys), to_host(values), grows)
        self.fetcher, self.block = fetcher, block
        self.fetched_bytes = 0
        self.fetch_wait_s = 0.0  # time the attention waited for a block's copy

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add new tokens' post-RoPE keys and values (copied to host memory)."""
        host = self._keys.device
        super().append(keys.to(host), values.to(host))

    def attend(self, query: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of `query [B, Hq, Lq, D]` over every stored token, streamed block by block: `(out, lse)`."""
        keys, values = self.tokens()
        starts = range(0, self.length, self.block)
        pending = self._fetch(keys, values, 0)
        out = lse = None
        for first in starts:
            began = time.perf_counter()
            block_keys, block_values = (self.fetcher.wait(part) for part in pending)
            self.fetch_wait_s += time.perf_counter() - began
            if first + self.block < self.length:
                pending = self._fetch(keys, values, first + self.block)
            part, part_lse = grouped_query_attention_with_lse(query, block_keys, block_values, scale)
            out, lse = (part, part_lse) if out is None else merge_attention_states(out, lse, part, part_lse)
        return out, lse

    def _fetch(self, keys: torch.Tensor, values: torch.Tensor, first: int) -> tuple:
        count = min(self.block, self.length - first)
        self.fetched_bytes += 2 * keys[:, :, :count].numel() * keys.element_size()
        return self.fetcher.start_range(keys, first, count), self.fetcher.start_range(values, first, count)

    def device_bytes(self) -> int:
        """Bytes this store holds on the device between attentions (none: the blocks are transient)."""
        return 0

    def host_bytes(self) -> int:
        """Bytes this store holds in host memory (its allocated capacity)."""
        return self.allocated_bytes()
