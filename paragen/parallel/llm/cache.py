"""`ShardedKVCache`: a transformers `Cache` whose layers each hold this rank's sequence shard.

`model.generate(..., **cache_argument(cache))` works as with any cache: the model's forward (wrapped by
`paragen.pipelines.llm`) feeds each rank its shard of the prompt, and the attention modules (replaced
by `paragen.parallel.llm.attention`) hand every layer's queries, keys and values to `attend`:
- prefill: ring attention over the shards (exact causal attention), then the shard's K/V go into a
  store — `DenseStore` (exact), `OffloadStore` (ShadowKV), per `KVConfig.mode`, or `HostStore` (exact, in host
  memory: speculative decoding's full cache in the offloaded setting);
- decode: each rank attends over its own shard and returns `(out, lse)`; the partial results of the
  ring's ranks are all-gathered and merged by log-sum-exp into exact attention over the whole context.
  A block of several new tokens (speculative verification) is attended causally, in one exchange per layer.
  A generated token's K/V is stored by the last rank only: it holds the sequence's tail, so every
  shard stays one contiguous range of positions and the recent window stays in one place.
`get_seq_length` reports the whole sequence's length, so `generate` positions new tokens correctly.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from paragen.comms import GroupComm
from paragen.kernels.chunk_fetch import ChunkFetcher
from paragen.parallel.llm.config import KVConfig
from paragen.parallel.llm.dense_store import DenseStore
from paragen.parallel.llm.host_store import HostStore
from paragen.parallel.llm.offload_store import OffloadStore, RopeTable
from paragen.parallel.llm.ring import ring_causal_attention
from paragen.parallel.llm.shards import shard_bounds
from paragen.parallel.sequence.attention import merge_over_group

MERGE_LABEL = "llm_decode_merge"
_CACHE_NAMES = ("cache", "past_key_values")  # transformers ≥ 5.24 says `cache`; earlier releases `past_key_values`


@functools.cache
def cache_keyword() -> str:
    """The keyword the installed transformers takes a cache by, in `generate` and in every model forward (the one its
    model outputs carry it under)."""
    return "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def cache_argument(cache: Cache) -> dict[str, Cache]:
    """`{keyword: cache}` for `model.generate(ids, **cache_argument(cache), ...)` on any supported transformers."""
    return {cache_keyword(): cache}


def cache_in(kwargs: dict[str, Any]) -> Cache | None:
    """The cache a transformers forward was given, under whichever keyword the caller used."""
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


class AttendingCache(Cache):
    """A cache whose layers' attention paragen computes: the attention modules (`paragen.parallel.llm.attention`)
    hand it each layer's queries, keys and values through `attend`. The rest is the transformers `Cache`
    interface, for a cache that serves one request."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[])
        self.num_layers = num_layers

    def attend(
        self, layer: int, query: torch.Tensor, key_pre: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Attention output `[B, Hq, L, D]` of the new tokens' queries over the cached tokens and themselves."""
        raise NotImplementedError

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError

    # ---- the transformers Cache interface -----------------------------------------------------------
    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} is filled by paragen's attention: parallelise the model with "
                           "paragen.parallelize_llm before generating with it")

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.get_seq_length() > 0

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    def __len__(self) -> int:
        return self.num_layers

    def reset(self) -> None:
        raise NotImplementedError(f"a {type(self).__name__} serves one request: make a new one")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported with a sequence-sharded cache")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("assisted decoding (crop) is not supported with a sequence-sharded cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("expanding the batch (num_return_sequences > 1) is not supported with a sharded cache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("selecting batch rows is not supported with a sequence-sharded cache")


class ShardedKVCache(AttendingCache):
    """The KV cache of one request on one rank: `layers` stores of this rank's shard of the sequence."""

    def __init__(self, num_layers: int, comm: GroupComm, kv: KVConfig, rope: RopeTable, device: torch.device) -> None:
        super().__init__(num_layers)
        self.comm, self.kv, self.rope = comm, kv, rope
        self.stores: list[DenseStore | HostStore | OffloadStore | None] = [None] * num_layers
        # Speculative decoding reads each layer's queries of the last forward (prefill: its last token) and
        # the keys and values of the last decode block (the verified tokens' exact K/V).
        self.queries: list[torch.Tensor | None] = [None] * num_layers
        self.block: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.bounds: list[tuple[int, int]] = []
        self.total = 0
        self._pending = 0
        self._phase = "idle"
        self.streams_host = kv.mode == "speculative" and kv.speculative.full_cache == "host"
        self.fetcher = ChunkFetcher(device) if kv.mode == "offload" or self.streams_host else None

    # ---- what the wrapped model forward calls -----------------------------------------------------
    def begin_prefill(self, length: int) -> tuple[int, int]:
        """Start the prompt's forward; returns this rank's `[start, end)` of the prompt."""
        if self.total:
            raise RuntimeError("this cache already holds a prompt; make a new one per request")
        self.bounds = shard_bounds(length, self.comm.size)
        self._phase, self._pending = "prefill", length
        return self.bounds[self.comm.rank]

    def begin_decode(self, count: int) -> int:
        """Start the forward of `count` new tokens (one block, attended causally); returns the position of the first."""
        if not self.total:
            raise RuntimeError("decode before prefill: the cache is empty")
        self._phase, self._pending = "decode", count
        return self.total

    def end_forward(self) -> None:
        """The forward finished: the sequence is longer by the tokens it carried."""
        self.total += self._pending
        self._phase, self._pending = "idle", 0

    @property
    def owns_new_tokens(self) -> bool:
        """Whether this rank stores generated tokens (the last rank of the ring)."""
        return self.comm.rank == self.comm.size - 1

    def rollback(self, count: int) -> None:
        """Drop the last `count` generated tokens (rejected drafts) from every layer, on every rank."""
        if not isinstance(self.stores[0], DenseStore):
            raise NotImplementedError(f"rolling back is supported by the dense store, not {self.kv.mode!r}")
        generated = self.total - self.bounds[-1][1]
        if not 0 <= count <= generated:
            raise ValueError(f"cannot roll back {count} tokens: {generated} were generated")
        self.total -= count
        if self.owns_new_tokens:
            for store in self.stores:
                store.truncate(store.length - count)

    # ---- what the attention modules call -------------------------------------------------------------
    def attend(
        self, layer: int, query: torch.Tensor, key_pre: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Attention output `[B, Hq, L, D]` of this rank's queries over the whole sequence so far.

        `query`, `key` are post-RoPE, `key_pre` the same keys before RoPE (the offload store factorises
        those); `key_pre`, `key`, `value` are `[B, Hkv, L, D]`.
        """
        speculative = self.kv.mode == "speculative"
        if self._phase == "prefill":
            lengths = [end - start for start, end in self.bounds]
            out = ring_causal_attention(query, key, value, self.comm, lengths, scale)
            self.stores[layer] = self._store(key_pre, key, value)
            if speculative:
                self.queries[layer] = query[:, :, -1:]
            return out
        if self._phase != "decode":
            raise RuntimeError("attend called outside a forward of the paragen-wrapped model")
        if speculative:
            self.queries[layer], self.block[layer] = query, (key, value)
        store = self.stores[layer]
        if self.owns_new_tokens:
            out, lse = store.append_and_attend(query, key, value, scale)
        else:
            out, lse = store.attend(query, scale)
        return merge_over_group(self.comm, out, lse, MERGE_LABEL, query.dtype)

    def _store(self, key_pre: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> DenseStore | OffloadStore:
        if self.streams_host:
            return HostStore(key, value, self.owns_new_tokens, self.fetcher, self.kv.speculative.host_block)
        if self.kv.mode != "offload":
            return DenseStore(key, value, grows=self.owns_new_tokens)
        start = self.bounds[self.comm.rank][0]
        return OffloadStore(key_pre, key, value, start, self.rope, self.kv, self.owns_new_tokens, self.fetcher)

    # ---- accounting ---------------------------------------------------------------------------------
    def device_bytes(self) -> int:
        """KV bytes this rank holds on its device, summed over layers."""
        return sum(s.device_bytes() for s in self.stores if s is not None)

    def host_bytes(self) -> int:
        """KV bytes this rank holds in host memory."""
        return sum(s.host_bytes() for s in self.stores if s is not None)

    def _fetching(self) -> list[OffloadStore | HostStore]:
        return [s for s in self.stores if isinstance(s, (OffloadStore, HostStore))]

    def fetched_bytes(self) -> int:
        """Host→device bytes fetched so far: value chunks (offload), or the full cache's blocks (speculative, host)."""
        return sum(s.fetched_bytes for s in self._fetching())

    def fetch_overlap_s(self) -> tuple[float, float]:
        """(seconds rebuilding keys while value fetches were in flight (offload), seconds then left waiting for
        fetches: value chunks, or the full cache's blocks while the previous block was attended)."""
        stores = self._fetching()
        return (sum(s.rebuild_s for s in stores if isinstance(s, OffloadStore)),
                sum(s.fetch_wait_s for s in stores))

    def close(self) -> None:
        """Stop the fetch worker (offload, or a full cache in host memory)."""
        if self.fetcher is not None:
            self.fetcher.close()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.total
