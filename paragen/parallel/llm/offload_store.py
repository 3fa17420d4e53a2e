"""`OffloadStore`: a shard's KV cache kept ShadowKV-style — low-rank keys, offloaded values, sparse fetch.

Built once from the shard's prefill K/V:
- the prompt's first `n·c` tokens form n chunks of c tokens; their pre-RoPE keys `[S, Hkv·D]` are
  factorised by SVD to rank r (`left [S, r]`, `right = diag(s)·Vᵀ [r, Hkv·D]`, both on the device) and
  their values go to host memory (pinned on CUDA);
- per chunk and key head a landmark, the mean post-RoPE key, stays on the device; the chunks whose keys
  stray furthest from their landmark (largest distance ‖k − landmark‖, in any head) are *outliers*,
  kept exact on the device in every head. ShadowKV ranks chunks by their lowest cosine to the landmark;
  the distance bounds the error of the landmark's score instead (|q·k − q·landmark| ≤ |q|·‖k − landmark‖)
  and, unlike the cosine, sees a needle whose key is long: on the passkey model the cosine ranked the
  chunk holding the key behind dozens of periodic filler chunks;
- the tokens after the last whole chunk (on the last shard at least the `window` most recent ones) and
  every generated token stay exact on the device, in a `DenseStore`.
Each decode step, per layer and key head: score the landmarks against the query, take the top-k
chunks within the budget, start fetching the values of those not already on the device from the
previous step, rebuild their keys from the factors and apply RoPE at their absolute positions while the
fetch runs, then attend over outliers + selected chunks + exact tokens.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from paragen.kernels.attention import grouped_query_attention_with_lse
from paragen.kernels.chunk_fetch import ChunkFetcher, to_host
from paragen.kernels.rope import apply_rope
from paragen.kernels.sparse_kv import (
    chunk_landmarks,
    chunk_max_deviation,
    chunked,
    gather_chunks,
    low_rank_factors,
    per_head_factor,
    rebuild_keys,
    select_chunks,
)
from paragen.parallel.llm.config import KVConfig
from paragen.parallel.llm.dense_store import DenseStore

# positions [...] -> (cos, sin) [..., D] of the model's rotary embedding
RopeTable = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class OffloadStore:
    """One layer's shard: `key_pre`, `key_rot` (post-RoPE), `values` are `[B, Hkv, S, D]`; the shard's
    first token sits at absolute position `start`. `holds_tail`: the shard ends the sequence, so it keeps
    the recent window exact and stores the generated tokens."""

    def __init__(
        self, key_pre: torch.Tensor, key_rot: torch.Tensor, values: torch.Tensor, start: int, rope: RopeTable,
        config: KVConfig, holds_tail: bool, fetcher: ChunkFetcher,
    ) -> None:
        batch, heads, length, dim = key_rot.shape
        size = config.chunk
        window = config.window if holds_tail else 0
        self.chunks = max(0, length - window) // size
        sparse = self.chunks * size
        self.head_dim, self.size, self.start, self.rope, self.fetcher = dim, size, start, rope, fetcher
        self.exact = DenseStore(key_rot[:, :, sparse:], values[:, :, sparse:], grows=holds_tail)
        self.fetched_bytes = 0
        self.rebuild_s = 0.0  # time spent rebuilding keys while a fetch was in flight ...
        self.fetch_wait_s = 0.0  # ... and time then spent waiting for the fetch to finish
        self._resident: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.count = 0
        if self.chunks == 0:
            return
        rank = config.key_rank(heads * dim)
        flat_keys = key_pre[:, :, :sparse].transpose(1, 2).reshape(batch, sparse, heads * dim)
        self.left, right = low_rank_factors(flat_keys, rank)
        self.right = per_head_factor(right, dim)
        self.landmarks = chunk_landmarks(key_rot[:, :, :sparse], size)
        outliers = min(self.chunks, math.ceil(config.outliers * self.chunks))
        # A chunk that strays in any head is kept exact in every head.
        stray = chunk_max_deviation(key_rot[:, :, :sparse], self.landmarks, size).amax(dim=1)
        picked = stray.topk(outliers, dim=-1).indices.sort(dim=-1).values
        picked = picked.unsqueeze(1).expand(batch, heads, outliers).contiguous()
        self.outlier_keys = gather_chunks(chunked(key_rot[:, :, :sparse], size), picked).flatten(2, 3)
        self.outlier_values = gather_chunks(chunked(values[:, :, :sparse], size), picked).flatten(2, 3)
        self.excluded = torch.zeros(batch, heads, self.chunks, dtype=torch.bool, device=key_rot.device)
        self.excluded.scatter_(-1, picked, True)
        self.host_values = to_host(chunked(values[:, :, :sparse], size))
        self.count = min(self.chunks - outliers, math.ceil(config.budget * length / size))

    @property
    def length(self) -> int:
        """Tokens held: the chunked prompt plus the exact tail and generated tokens."""
        return self.chunks * self.size + self.exact.length

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Generated tokens stay exact on the device."""
        self.exact.append(keys, values)

    def append_and_attend(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a new token, then attend its query (the offload store decodes one token per forward)."""
        if keys.shape[2] != 1:
            raise NotImplementedError("the offload store decodes one token per forward, not a block")
        self.append(keys, values)
        return self.attend(query, scale)

    def attend(self, query: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of `query [B, Hq, 1, D]` over outliers, the selected chunks and the exact tokens: `(out, lse)`."""
        keys, values = [], []
        if self.count > 0:
            selected_keys, selected_values = self._select(query)
            keys += [self.outlier_keys, selected_keys]
            values += [self.outlier_values, selected_values]
        exact_keys, exact_values = self.exact.tokens()
        keys.append(exact_keys)
        values.append(exact_values)
        return grouped_query_attention_with_lse(query, torch.cat(keys, dim=2), torch.cat(values, dim=2), scale)

    def _select(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[B, Hkv, k·c, D]` of this step's top-k chunks, reusing last step's where chosen again."""
        chosen = select_chunks(query, self.landmarks, self.count, self.excluded)
        if self._resident is None:
            keys = query.new_empty(*chosen.shape, self.size, self.head_dim)
            values = torch.empty_like(keys)
            missing = torch.ones_like(chosen, dtype=torch.bool)
        else:
            held, held_keys, held_values = self._resident
            same = chosen.unsqueeze(-1) == held.unsqueeze(-2)
            source = same.to(torch.int8).argmax(dim=-1)
            keys, values = gather_chunks(held_keys, source), gather_chunks(held_values, source)
            missing = ~same.any(dim=-1)
        batch_index, head_index, slot = missing.nonzero(as_tuple=True)
        if len(slot):
            chunk = chosen[batch_index, head_index, slot]
            began = time.perf_counter()
            pending = self.fetcher.start(self.host_values, (batch_index, head_index, chunk))
            rows = chunk.unsqueeze(-1) * self.size + torch.arange(self.size, device=chunk.device)
            cos, sin = self.rope(self.start + rows)
            rebuilt = rebuild_keys(self.left, self.right, batch_index, head_index, rows)
            keys[batch_index, head_index, slot] = apply_rope(rebuilt, cos, sin).to(keys.dtype)
            rebuilt_at = time.perf_counter()
            fetched = self.fetcher.wait(pending)
            self.rebuild_s += rebuilt_at - began
            self.fetch_wait_s += time.perf_counter() - rebuilt_at
            values[batch_index, head_index, slot] = fetched.to(values.dtype)
            self.fetched_bytes += _nbytes(fetched)
        self._resident = (chosen, keys, values)
        return keys.flatten(2, 3), values.flatten(2, 3)

    def device_bytes(self) -> int:
        """Bytes held on the device: factors, landmarks, outliers, last step's chunks and the exact tokens."""
        held = self._resident[1:] if self._resident is not None else ()
        kept = (self.left, self.right, self.landmarks, self.excluded, self.outlier_keys, self.outlier_values) if self.chunks else ()
        return _nbytes(*kept, *held) + self.exact.device_bytes()

    def host_bytes(self) -> int:
        """Bytes of offloaded values in host memory."""
        return _nbytes(self.host_values) if self.chunks else 0
