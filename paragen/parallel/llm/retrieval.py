"""The retrieval cache: the target model's draft cache in speculative decoding, chosen over the whole sharded
context.

Every rank cuts the tokens it holds — except the first `sink` and the last `recent` of the sequence, which are
always kept — into chunks of `chunk` tokens and scores each chunk, per layer and key head, by its landmark
(mean post-RoPE key) against a query of the newest token (`chunk_scores`). The scores of every rank are
all-gathered (`llm_retrieval_scores`: a few floats per chunk), and every rank takes the same global top-k per
layer and key head: the budget goes to the best chunks wherever they live, not an equal share per rank. Each
rank then sends its sink/recent tokens and its chosen chunks' exact keys and values to the drafting rank
(`llm_retrieval_kv`, one gather), which compacts them into a `LocalCache`.

Placement: the retrieval cache lives on one rank, the drafting rank (rank 0), and only it drafts. A drafted
token is then one local forward, with no communication at all; the other ranks would only have repeated the
same draft (their copy of the cache would cost memory and a broadcast of the whole selection), and they wait
for the drafted tokens at the verification. Two collectives build it; a refresh repeats them.
"""
from __future__ import annotations

import torch

from paragen.kernels.sparse_kv import chunk_landmarks, chunk_scores, chunked, gather_chunks
from paragen.parallel.llm.cache import ShardedKVCache
from paragen.parallel.llm.config import SpeculativeConfig
from paragen.parallel.llm.dense_store import DenseStore
from paragen.parallel.llm.local_cache import LocalCache

SCORES_LABEL = "llm_retrieval_scores"
KV_LABEL = "llm_retrieval_kv"
DRAFTING_RANK = 0


def held_ranges(cache: ShardedKVCache) -> list[tuple[int, int]]:
    """`[start, end)` of the positions each rank's stores hold now: its prompt shard, and on the last rank the
    generated tokens too."""
    ranges = list(cache.bounds)
    ranges[-1] = (ranges[-1][0], cache.total)
    return ranges


def _plan(start: int, end: int, total: int, spec: SpeculativeConfig) -> tuple[torch.Tensor, int, int]:
    """For a rank holding positions `[start, end)`: the local indices of its always-kept tokens (sink and
    recent), and the local offset and count of its candidate chunks (the tokens between, in whole chunks)."""
    positions = torch.arange(start, end)
    kept = ((positions < spec.sink) | (positions >= total - spec.recent)).nonzero().flatten()
    first, last = max(start, spec.sink), min(end, total - spec.recent)
    return kept, first - start, max(0, last - first) // spec.chunk


def _valid_slots(picked: torch.Tensor, slots: int) -> torch.Tensor:
    """`(order, valid)`: the chunk indices a rank sends, chosen ones first in position order, padded to `slots`,
    and which of those slots hold a chosen chunk."""
    valid, order = picked.to(torch.uint8).sort(dim=-1, descending=True, stable=True)
    return order[..., :slots], valid[..., :slots].bool()


def build_retrieval(cache: ShardedKVCache, queries: list[torch.Tensor], spec: SpeculativeConfig) -> LocalCache | None:
    """The retrieval cache for the sequence `cache` holds, scored by each layer's `queries [B, Hq, 1, D]` (the
    same on every rank); the drafting rank gets it, the others None. Every rank must call it."""
    comm = cache.comm
    ranges = held_ranges(cache)
    plans = [_plan(start, end, cache.total, spec) for start, end in ranges]
    counts = [count for _, _, count in plans]
    kept, offset, count = plans[comm.rank]
    region = slice(offset, offset + count * spec.chunk)
    held = [store.tokens() for store in cache.stores]  # in host memory when the full cache lives there
    device = queries[0].device
    scores = torch.stack([chunk_scores(query, chunk_landmarks(keys[:, :, region], spec.chunk).to(device))
                          for query, (keys, _) in zip(queries, held)]).float()  # [layers, B, Hkv, n]
    everyone = comm.all_gather_varlen(scores, 3, counts, SCORES_LABEL)
    chosen = min((spec.budget - spec.sink - spec.recent) // spec.chunk, sum(counts))
    picked = torch.zeros_like(everyone, dtype=torch.bool)
    picked.scatter_(-1, everyone.topk(chosen, dim=-1).indices, True)
    per_rank = picked.split(counts, dim=-1)
    slots = [int(part.sum(dim=-1).max()) if part.shape[-1] else 0 for part in per_rank]
    order, _ = _valid_slots(per_rank[comm.rank], slots[comm.rank])
    payload = torch.stack([
        torch.stack([torch.cat([states[:, :, kept], gather_chunks(chunked(states[:, :, region], spec.chunk),
                                                                   order[layer].to(states.device)).flatten(2, 3)], dim=2)
                     for states in (keys, values)])
        for layer, (keys, values) in enumerate(held)
    ]).to(device)  # [layers, 2, B, Hkv, kept + slots·chunk, D]
    sizes = [len(plan[0]) + slots[rank] * spec.chunk for rank, plan in enumerate(plans)]
    gathered = comm.gather_varlen(payload, 4, sizes, DRAFTING_RANK, KV_LABEL)
    if comm.rank != DRAFTING_RANK:
        return None
    valid = torch.cat([
        torch.cat([torch.ones(*part.shape[:-1], len(plan[0]), dtype=torch.bool, device=part.device),
                   _valid_slots(part, slots[rank])[1].repeat_interleave(spec.chunk, dim=-1)], dim=-1)
        for rank, (part, plan) in enumerate(zip(per_rank, plans))
    ], dim=-1)  # [layers, B, Hkv, tokens sent]
    size = sum(len(plan[0]) for plan in plans) + chosen * spec.chunk
    keep = valid.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[..., :size]
    index = keep[:, None, ..., None].expand(-1, 2, -1, -1, -1, gathered.shape[-1]).to(gathered.device)
    selected = gathered.gather(4, index)
    return LocalCache([DenseStore(layer[0], layer[1], grows=True) for layer in selected])
