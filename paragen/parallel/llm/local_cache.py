"""`LocalCache`: a one-rank KV cache that speculative decoding drafts over (the retrieval cache of the target
model, the StreamingLLM cache of a draft model).

Each layer is a `DenseStore` of exact post-RoPE keys and values at their absolute positions. The first
`committed` tokens are kept; what a draft forward adds after them is scratch, cut back (`truncate`, `rewind`)
once the drafted tokens are checked. Attention over it needs no other rank.
"""
from __future__ import annotations

import torch

from paragen.parallel.llm.cache import AttendingCache
from paragen.parallel.llm.dense_store import DenseStore


class LocalCache(AttendingCache):
    """Per-layer stores of one rank; `stores[i]` holds layer i's committed tokens (and any scratch)."""

    def __init__(self, stores: list[DenseStore]) -> None:
        super().__init__(len(stores))
        self.stores = stores
        self.committed = stores[0].length

    def attend(
        self, layer: int, query: torch.Tensor, key_pre: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        return self.stores[layer].append_and_attend(query, key, value, scale)[0]

    @property
    def length(self) -> int:
        """Tokens held, scratch included."""
        return self.stores[0].length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens (at least the committed ones)."""
        if length < self.committed:
            raise ValueError(f"cannot cut the cache to {length} tokens: {self.committed} are committed")
        for store in self.stores:
            store.truncate(length)

    def rewind(self) -> None:
        """Drop every scratch token."""
        self.truncate(self.committed)

    def commit(self, length: int) -> None:
        """Keep the first `length` tokens held as committed, drop the scratch after them."""
        self.truncate(length)
        self.committed = length

    def extend(self, block: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Drop the scratch and commit the given keys and values `[B, Hkv, n, D]` of each layer."""
        self.rewind()
        for store, (keys, values) in zip(self.stores, block):
            store.append(keys, values)
        self.committed = self.length

    def device_bytes(self) -> int:
        """Bytes the stores hold (their allocated capacity)."""
        return sum(store.device_bytes() for store in self.stores)


def empty_stores(layers: int, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> list[DenseStore]:
    """`layers` empty stores that keep spare room for the tokens to come."""
    empty = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
    return [DenseStore(empty, empty, grows=True) for _ in range(layers)]


class StreamingCache(LocalCache):
    """A draft model's StreamingLLM cache: the first `sink` tokens and the most recent ones, `window` in all,
    kept when tokens are committed. Keys stay at their absolute positions (StreamingLLM renumbers them within
    the cache, which a model with enough positions does not need)."""

    def __init__(self, stores: list[DenseStore], sink: int, window: int) -> None:
        super().__init__(stores)
        self.sink, self.window = sink, window

    def commit(self, length: int) -> None:
        """Commit the first `length` tokens held, then evict the oldest past the sink down to `window`."""
        super().commit(length)
        excess = self.length - self.window
        if excess <= 0:
            return
        for store in self.stores:
            keys, values = store.tokens()
            keep = torch.cat([torch.arange(self.sink), torch.arange(self.sink + excess, store.length)]).to(keys.device)
            kept_keys, kept_values = keys[:, :, keep], values[:, :, keep]
            store.truncate(0)
            store.append(kept_keys, kept_values)
        self.committed = self.length
